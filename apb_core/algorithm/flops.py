"""The FLOP model: what a prefill costs per token and per query-key pair, and what each host of a layout runs.

Used by `apb bench` (effective / executed TFLOP/s) and by the layout defaults: at short contexts APB's anchor
(tokens every host h > 0 runs through QKV and the MLP a second time) can cost more than passing every earlier
token uncompressed, which is exact. `last_host_flops` lets the defaults pick the exact layout there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from apb_core.algorithm.layout import ALL


def apb_pairs(anchor_len: int, passing_len: int, local_len: int) -> int:
    """Query-key pairs the APB mask allows on one host, per head: the anchor causally, then each local token over
    the passing block, the anchor and its own block causally (the useful work of its attention)."""
    a, p, n = anchor_len, passing_len, local_len
    return a * (a + 1) // 2 + n * (p + a) + n * (n + 1) // 2


@dataclass(frozen=True)
class ModelDims:
    """The shapes the FLOP model needs, read from a transformers config."""

    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: Any) -> ModelDims:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                   cfg.num_key_value_heads, head_dim, cfg.vocab_size)

    @property
    def linear_flops_per_token(self) -> float:
        """2 x the projection and MLP weights of all layers (LM head excluded: prefill computes no logits)."""
        qkv = self.hidden * (self.q_heads + 2 * self.kv_heads) * self.head_dim
        o = self.q_heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return 2.0 * (qkv + o + mlp) * self.layers

    @property
    def attention_flops_per_pair(self) -> float:
        """QKᵀ and PV for one query-key pair, every head, every layer."""
        return 4.0 * self.q_heads * self.head_dim * self.layers

    def exact_flops(self, n: int) -> float:
        """Causal prefill of n tokens: the exact-equivalent work every method is credited with."""
        return self.linear_flops_per_token * n + self.attention_flops_per_pair * n * (n + 1) / 2


def host_flops(dims: ModelDims, anchor_len: int, received: int, block_len: int) -> float:
    """Prefill FLOPs of one host: its anchor and block through every linear layer, and the pairs of the APB mask
    (the anchor causally; each block token over the passing block, the anchor and its own block causally)."""
    pairs = apb_pairs(anchor_len, received, block_len)
    return dims.linear_flops_per_token * (anchor_len + block_len) + dims.attention_flops_per_pair * pairs


def layout_flops(dims: ModelDims, block_lens: list[int], anchor_len: int, passing_len: int | str) -> list[float]:
    """Every host's prefill FLOPs for blocks of `block_lens` tokens. passing_len ALL: every earlier token passed
    (exact), 0: none. Host 0 has no anchor. (The question probe, a few dozen tokens on hosts < H-1, is left out.)"""
    out, received = [], 0
    for h, n in enumerate(block_lens):
        anchor = 0 if h == 0 else anchor_len
        out.append(host_flops(dims, anchor, received, n))
        received += n if passing_len == ALL else min(int(passing_len), n)
    return out


# Seconds of all-gather, priced in FLOPs of attention on the same device: measured rates over each other.
# H200 (2026-11-22): cuDNN attention ~600 TFLOP/s, NCCL all-gather ~238 GiB/s -> ~2350 FLOP per byte.
# CPU, the 2-core test machine (2026-11-30, another job running): causal attention 51 GFLOP/s on 2 threads, gloo
# all-gather over loopback 0.32 GB/s gathered per rank (2 ranks, 16 MiB each) -> ~160 FLOP per byte.
FLOPS_PER_BYTE = {"cuda": 2350.0, "cpu": 160.0}


def passing_bytes(dims: ModelDims, block_lens: list[int], passing_len: int | str, dtype_bytes: int = 2) -> float:
    """Bytes one prefill's all-gathers move into each host, every layer together: each layer gathers every host's
    kept K|V in a slot as long as the largest host's count (apb_core.algorithm.passing)."""
    counts = [n if passing_len == ALL else min(int(passing_len), n) for n in block_lens]
    if not any(counts):
        return 0.0
    per_token = 2 * dims.kv_heads * dims.head_dim * dtype_bytes * dims.layers  # K and V, every layer
    return len(block_lens) * max(counts) * per_token


def last_host_flops(dims: ModelDims, context_len: int, hosts: int, anchor_len: int, passing_len: int | str) -> float:
    """Prefill FLOPs of the last host of an equal layout (the busiest: it receives every earlier passing block)."""
    block = math.ceil(context_len / hosts)
    return layout_flops(dims, [block] * hosts, anchor_len, passing_len)[-1]


def balanced_lengths(dims: ModelDims, context_len: int, hosts: int, anchor_len: int,
                     passing_len: int | str) -> list[int]:
    """Block lengths (summing to `context_len`, each >= 1) that give every host about the same prefill FLOPs.

    Why: with equal blocks host 0 (no anchor, nothing received) idles while the last host, which runs the anchor
    and attends every passing block, finishes (32 % of APB's prefill at 128K on 2 GPUs). Solved by bisection on
    the per-host budget T: walking the hosts in order (what host h receives depends on the blocks before it),
    each takes the longest block whose cost stays within T; the smallest T whose blocks cover the context wins,
    and the last host takes the remainder.
    """
    if hosts == 1:
        return [context_len]

    def fill(budget: float) -> list[int]:
        lens, received = [], 0
        for h in range(hosts):
            anchor = 0 if h == 0 else anchor_len
            lo, hi = 1, context_len  # the longest n with cost <= budget (at least one token)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if host_flops(dims, anchor, received, mid) <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            lens.append(lo)
            received += lo if passing_len == ALL else min(int(passing_len), lo)
        return lens

    low, high = 0.0, dims.exact_flops(context_len) * 4 + host_flops(dims, context_len, context_len, context_len)
    for _ in range(100):
        mid = (low + high) / 2
        if sum(fill(mid)) >= context_len:
            high = mid
        else:
            low = mid
        if high - low <= high * 1e-9:
            break
    lens = fill(high)
    lens[-1] = context_len - sum(lens[:-1])
    if lens[-1] < 1:  # tiny contexts: fall back to blocks that differ by at most one token
        base, extra = divmod(context_len, hosts)
        return [base + (1 if h < extra else 0) for h in range(hosts)]
    return lens
