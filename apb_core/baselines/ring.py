"""Ring attention (exact) with the zigzag layout, as a prefill strategy of the engine.

Layout: the context is cut into 2H chunks whose lengths differ by at most one token; host r holds chunks r
and 2H-1-r at their true positions. With causal attention the early chunks are cheap and the late ones
dear, so pairing chunk r with chunk 2H-1-r gives every host the same work (the zigzag of ring-flash-attention,
zhuzilin/ring-flash-attention's zigzag_ring_flash_attn).

Per layer, host r first attends its own two chunks (one square causal call: the two chunks in order ARE a
causal sequence, the gap between them holds no keys of this host). Then the K/V of the other hosts come by
around the ring, one host per step, sent with P2P while the current step computes. For the K/V of host
src, the causal rule per chunk pair leaves exactly one dense piece:
- src < r: every local query sees src's first chunk (src < r) and none of its second (2H-1-src > 2H-1-r);
- src > r: only the local second chunk (2H-1-r) sees src's chunks, and it sees both of them.
Each piece is one non-causal call; partials are merged into an fp32 accumulator with `merge_partials`, the
project's one log-sum-exp merge. K/V travel un-expanded (GQA heads are repeated, if at all, by the kernel).

After prefill each host caches the exact KV of its two chunks. Decode needs nothing else: the query attends
non-causally to every host's cache and the last host appends the query's and the answer's KV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from apb_core.algorithm.attention import merge_partials
from apb_core.algorithm.layout import split_blocks
from apb_core.dist.comm import process_group
from kernels import attention_with_lse


@dataclass(frozen=True)
class ZigzagPlan:
    """Host `rank`'s share of the context under the zigzag layout (a prefill Plan: apb_core.runtime.prefill).

    chunks: the 2H [start, end) context chunks, the same on every host.
    """

    rank: int
    hosts: int
    chunks: tuple[tuple[int, int], ...]

    def held(self, rank: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
        """The two chunks host `rank` (default: this one) holds, in position order."""
        r = self.rank if rank is None else rank
        return self.chunks[r], self.chunks[2 * self.hosts - 1 - r]

    def lengths(self, rank: int | None = None) -> tuple[int, int]:
        first, second = self.held(rank)
        return first[1] - first[0], second[1] - second[0]

    @property
    def block_len(self) -> int:
        return sum(self.lengths())

    @property
    def kept(self) -> slice:
        """Every token this host prefills is cached: no anchor, no probe."""
        return slice(0, self.block_len)

    def input_ids(self, context_ids: list[int]) -> torch.Tensor:
        """[1, block_len]: this host's two chunks, concatenated."""
        (a0, a1), (b0, b1) = self.held()
        return torch.tensor([context_ids[a0:a1] + context_ids[b0:b1]], dtype=torch.long)

    def position_ids(self) -> torch.Tensor:
        """[1, block_len]: the chunks' true global positions."""
        (a0, a1), (b0, b1) = self.held()
        return torch.cat([torch.arange(a0, a1), torch.arange(b0, b1)]).unsqueeze(0)


def zigzag_plans(context_len: int, hosts: int) -> list[ZigzagPlan]:
    """One ZigzagPlan per host for a context of `context_len` tokens."""
    chunks = tuple(split_blocks(context_len, 2 * hosts))
    return [ZigzagPlan(rank, hosts, chunks) for rank in range(hosts)]


def ring_pairs(plan: ZigzagPlan) -> int:
    """Query-key pairs host `plan.rank` attends over one layer and head (the causal pairs of its queries)."""
    m1, m2 = plan.lengths()
    pairs = (m1 + m2) * (m1 + m2 + 1) // 2
    for src in range(plan.hosts):
        n1, n2 = plan.lengths(src)
        if src < plan.rank:
            pairs += (m1 + m2) * n1
        elif src > plan.rank:
            pairs += m2 * (n1 + n2)
    return pairs


def ring_prefill(call, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Exact causal attention of this host's zigzag chunks against the whole context, K/V passed on a ring.

    q: [B, Hq, S, D], k, v: [B, Hkv, S, D] with S = this host's two chunks. Returns out [B, Hq, S, D].
    `call` is the engine's PrefillCall: `call.plan` a ZigzagPlan, `call.comm` one host per process
    (its `group`; None: the default group).
    """
    plan: ZigzagPlan = call.plan
    hosts, rank = plan.hosts, plan.rank
    if hosts == 1:
        return attention_with_lse(q, k, v, causal=True, scale=scale)[0]
    group = process_group(call.comm, "ring")
    send_to, recv_from = (rank + 1) % hosts, (rank - 1) % hosts
    if group is not None:
        send_to, recv_from = dist.get_global_rank(group, send_to), dist.get_global_rank(group, recv_from)

    def post(buffer: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Send `buffer` to the next host and receive the previous host's into a new buffer (async)."""
        incoming = torch.empty_like(buffer)
        ops = [dist.P2POp(dist.isend, buffer, send_to, group), dist.P2POp(dist.irecv, incoming, recv_from, group)]
        return incoming, dist.batch_isend_irecv(ops)

    m1, _ = plan.lengths()
    slot = max(sum(plan.lengths(h)) for h in range(hosts))
    # a packed [2, B, Hkv, slot, D] buffer so one send moves K and V; its tail past a host's length is unused
    current = k.new_empty(2, *k.shape[:2], slot, k.shape[3])
    current[0, :, :, : k.shape[2]] = k
    current[1, :, :, : v.shape[2]] = v
    incoming, requests = post(current)
    out, lse = attention_with_lse(q, k, v, causal=True, scale=scale)  # overlaps the first transfer
    acc_out, acc_lse = out.float(), lse
    for step in range(1, hosts):
        for request in requests:
            request.wait()
        current = incoming
        if step + 1 < hosts:  # pass it on while this step computes
            incoming, requests = post(current)
        src = (rank - step) % hosts
        n1, n2 = plan.lengths(src)
        if src < rank:  # all local queries see src's first chunk only
            rows = slice(0, q.shape[2])
            part, part_lse = attention_with_lse(q, current[0, :, :, :n1], current[1, :, :, :n1], False, scale)
        else:  # only the local second chunk sees src's chunks, both of them
            rows = slice(m1, q.shape[2])
            keys, values = current[0, :, :, : n1 + n2], current[1, :, :, : n1 + n2]
            part, part_lse = attention_with_lse(q[:, :, m1:], keys, values, False, scale)
        merged, merged_lse = merge_partials([acc_out[:, :, rows], part], [acc_lse[:, :, rows], part_lse])
        acc_out[:, :, rows] = merged
        acc_lse[:, :, rows] = merged_lse
    return acc_out.to(q.dtype)
