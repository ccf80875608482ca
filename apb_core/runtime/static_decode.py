"""Decode steps with static shapes, captured once per prefill in a CUDA graph and replayed for every token.

Why: an eager decode step of a transformers model launches a few hundred small kernels from Python (norms,
projections, RoPE, our attention, the log-sum-exp merge, one all-gather per layer). At 128K tokens on 2×H200
with the Llama-3.1-8B shape that cost 55.7 ms per token where reading the weights and half the KV cache takes
about 5 ms: the launches, not the bytes, set the time. A CUDA graph replays the whole step, the per-layer
NCCL all-gather included, with one launch: 11.8 ms per token measured there (docs/benchmarks.md).

What makes the step capturable: the token id, its position and each host's cache length live in device tensors
that are filled before each replay; the last host writes the new K/V with `index_copy_` at that length; and
every host attends over its whole preallocated cache, told the filled length by a device tensor
(kernels.DecodeAttention), so no shape depends on how many tokens have been generated. On CPU the same static
step runs eagerly (tests compare it with the engine's eager decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from apb_core.algorithm.attention import merge_partials
from apb_core.algorithm.passing import all_gather_packed
from apb_core.runtime.attention_mass import AttentionMass
from apb_core.runtime.cache import HostCache
from kernels import DecodeAttention

WARMUP_STEPS = 2  # eager runs on a side stream before capture (allocator and NCCL set-up happen there)


@dataclass
class StaticDecodeCall:
    """The attention of one decode step, shapes fixed by the cache's capacity.

    length: [] long, the keys this host held before the step; the last host writes the new token's K/V there.
    """

    cache: HostCache
    hosts: int
    is_last: bool
    group: Any
    length: torch.Tensor
    attention: DecodeAttention
    mass: AttentionMass | None = None  # --cite: the block slots are a fixed slice of the cache (static shapes)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]  # [B, Hkv, capacity, D]
        used = self.length.view(1)
        if self.is_last:  # the new token is a key of its own query
            k_cache.index_copy_(2, used, k)
            v_cache.index_copy_(2, used, v)
            used = used + 1
        out, lse = self.attention(q, k_cache, v_cache, used.to(torch.int32), scale)
        if self.hosts == 1:
            if self.mass is not None:
                self.mass.add(layer, q, k_cache[:, :, : self.mass.block_len], lse, scale)
            return out
        packed = torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1)  # [B, Hq, 1, D+1]
        gathered = all_gather_packed(packed, self.hosts, self.group)  # [H, B, Hq, 1, D+1]
        merged, lse_all = merge_partials([g[..., :-1] for g in gathered], [g[..., -1] for g in gathered])
        if self.mass is not None:
            self.mass.add(layer, q, k_cache[:, :, : self.mass.block_len], lse_all, scale)
        return merged.to(q.dtype)


class StaticDecoder:
    """One-token decode steps over the engine's current cache: replayed from a CUDA graph when `graph`, else
    run eagerly with the same static code. Built after a prefill and the query phase (every host at the same
    point: capture runs the step's collectives); valid until the next prefill replaces the cache."""

    def __init__(self, engine, graph: bool) -> None:
        device = engine.device
        self.engine = engine
        self.cache: HostCache = engine.cache
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.length = torch.tensor(self.cache.length, dtype=torch.long, device=device)
        attention = DecodeAttention(device, engine.dtype, engine.head_dim, self.cache.capacity)
        self.call = StaticDecodeCall(self.cache, engine.hosts, engine.is_last, engine.group, self.length, attention,
                                     engine.mass)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if graph:
            self._capture()

    def _forward(self) -> torch.Tensor:
        return self.engine.forward_logits(self.ids, self.pos, self.call)

    def _capture(self) -> None:
        mass = self.call.mass
        kept = mass.mass.clone() if mass is not None else None  # the query phase's row, before warm-up adds to it
        side = torch.cuda.Stream(self.engine.device)
        side.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):  # writes scratch K/V at the next free slot: the first real step overwrites it
                self._forward()
        torch.cuda.current_stream(self.engine.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        if kept is not None:
            mass.mass.copy_(kept)

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Run `token` at position `pos` on this host; returns the last-token logits [V] fp32 (a buffer that the
        next step overwrites: read it before stepping again)."""
        if self.cache.length >= self.cache.capacity and self.engine.is_last:
            raise RuntimeError(f"KV cache overflow: {self.cache.length + 1} > capacity {self.cache.capacity}")
        self.ids.fill_(token)
        self.pos.fill_(pos)
        self.length.fill_(self.cache.length)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
        if self.engine.is_last:
            self.cache.length += 1
        return logits
