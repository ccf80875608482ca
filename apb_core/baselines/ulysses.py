"""Ulysses attention (exact) as a prefill strategy of the engine: swap the sharded dimension, not the KV.

Layout: contiguous blocks (like layout.split_blocks), no anchor. Per layer one all-to-all turns
"every head of my block" into "my heads of the whole sequence"; each host runs ordinary causal attention over
the full sequence on its heads; a second all-to-all turns the output back (DeepSpeed-Ulysses, Jacobs et al., 2023).

Heads are cut into H contiguous groups whose sizes differ by at most one, so any head count works with any H.
With GQA a host needs the KV heads its query heads read; when a KV head serves query heads on two hosts it
is sent to both (replicated), which is what lets 8 KV heads run on 3 hosts, or 2 KV heads on 4. When a
host's query heads cover whole GQA groups the kernel reads the KV heads as they are; otherwise they are
repeated to one per query head before the call.

The all-to-all moves flat buffers with per-host split sizes (`all_to_all_single`), which gloo and NCCL both
implement, so the same code runs on CPU tests and GPUs. After prefill each host caches the exact KV of its
own block; decode is the engine's usual log-sum-exp merge across hosts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from apb_core.algorithm.layout import split_blocks
from apb_core.dist.comm import process_group
from kernels import attention_with_lse


@dataclass(frozen=True)
class BlockPlan:
    """Host `rank`'s contiguous block (a prefill Plan: apb_core.runtime.prefill); `bounds` holds every host's."""

    rank: int
    hosts: int
    bounds: tuple[tuple[int, int], ...]

    @property
    def block_start(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def block_end(self) -> int:
        return self.bounds[self.rank][1]

    @property
    def block_len(self) -> int:
        return self.block_end - self.block_start

    @property
    def kept(self) -> slice:
        """Every token this host prefills is cached: no anchor, no probe."""
        return slice(0, self.block_len)

    def input_ids(self, context_ids: list[int]) -> torch.Tensor:
        """[1, block_len] token ids of this host's block."""
        return torch.tensor([context_ids[self.block_start : self.block_end]], dtype=torch.long)

    def position_ids(self) -> torch.Tensor:
        """[1, block_len] true global positions."""
        return torch.arange(self.block_start, self.block_end).unsqueeze(0)


def block_plans(context_len: int, hosts: int) -> list[BlockPlan]:
    """One BlockPlan per host: contiguous blocks whose lengths differ by at most one token."""
    bounds = tuple(split_blocks(context_len, hosts))
    return [BlockPlan(rank, hosts, bounds) for rank in range(hosts)]


def head_groups(q_heads: int, kv_heads: int, hosts: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per host: ([q_start, q_end), [kv_start, kv_end)) — its query heads and the KV heads they read."""
    if q_heads < hosts:
        raise ValueError(f"Ulysses needs at least one query head per host: {q_heads} heads, {hosts} hosts")
    group = q_heads // kv_heads
    out = []
    for start, end in split_blocks(q_heads, hosts):
        out.append(((start, end), (start // group, (end - 1) // group + 1)))
    return out


def _a2a(parts: list[list[torch.Tensor]], recv_numels: list[int], group) -> list[torch.Tensor]:
    """All-to-all: the tensors parts[d] go to host d (packed flat, one copy); returns the flat piece received
    from each host."""
    sizes = [sum(t.numel() for t in tensors) for tensors in parts]
    send = parts[0][0].new_empty(sum(sizes))
    offset = 0
    for tensors in parts:
        for t in tensors:
            send[offset : offset + t.numel()].view(t.shape).copy_(t)
            offset += t.numel()
    recv = send.new_empty(sum(recv_numels))
    dist.all_to_all_single(recv, send, recv_numels, sizes, group=group)
    return list(recv.split(recv_numels))


def ulysses_pairs(plan: BlockPlan, q_heads: int, kv_heads: int) -> float:
    """Query-key pairs per layer this host attends, in units of all-head pairs (causal over the context,
    scaled by its share of the query heads)."""
    n = plan.bounds[-1][1]
    (qa, qb), _ = head_groups(q_heads, kv_heads, plan.hosts)[plan.rank]
    return n * (n + 1) / 2 * (qb - qa) / q_heads


def ulysses_prefill(call, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Exact causal attention of this host's block against the whole context via two all-to-alls.

    q: [B, Hq, S_r, D], k, v: [B, Hkv, S_r, D]; returns out [B, Hq, S_r, D]. `call` is the engine's PrefillCall
    (`call.plan` a BlockPlan; `call.timer` times the all-to-alls in bench's breakdown mode).
    """
    plan: BlockPlan = call.plan
    hosts, rank = plan.hosts, plan.rank
    if hosts == 1:
        return attention_with_lse(q, k, v, causal=True, scale=scale)[0]
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    groups = head_groups(hq, hkv, hosts)
    lens = [end - start for start, end in plan.bounds]
    (qa, qb), (ka, kb) = groups[rank]
    my_q, my_kv = qb - qa, kb - ka
    pg = process_group(call.comm, "ulysses")

    with call.timer.region("all-to-all"):
        parts = [[q[:, qs:qe], k[:, ks:ke], v[:, ks:ke]] for (qs, qe), (ks, ke) in groups]
        pieces = _a2a(parts, [b * n * d * (my_q + 2 * my_kv) for n in lens], pg)
        qs_, ks_, vs_ = [], [], []
        for n, piece in zip(lens, pieces, strict=True):
            q_part, k_part, v_part = piece.split([b * my_q * n * d, b * my_kv * n * d, b * my_kv * n * d])
            qs_.append(q_part.view(b, my_q, n, d))
            ks_.append(k_part.view(b, my_kv, n, d))
            vs_.append(v_part.view(b, my_kv, n, d))
        q_full, k_full, v_full = torch.cat(qs_, dim=2), torch.cat(ks_, dim=2), torch.cat(vs_, dim=2)

    group = hq // hkv
    if qa % group or my_q % group:  # the local query heads split a GQA group: one KV head per query head
        index = torch.tensor([h // group - ka for h in range(qa, qb)], device=k_full.device)
        k_full, v_full = k_full.index_select(1, index), v_full.index_select(1, index)
    out_full, _ = attention_with_lse(q_full, k_full, v_full, causal=True, scale=scale)  # [B, my_q, N, D]

    with call.timer.region("all-to-all"):
        starts = [start for start, _ in plan.bounds]
        back = [[out_full[:, :, s : s + n]] for s, n in zip(starts, lens, strict=True)]
        pieces = _a2a(back, [b * (qe - qs) * lens[rank] * d for (qs, qe), _ in groups], pg)
        outs = [piece.view(b, qe - qs, lens[rank], d) for piece, ((qs, qe), _) in zip(pieces, groups, strict=True)]
        return torch.cat(outs, dim=1)
