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

from apb_core.runtime.attention_mass import AttentionMass
from apb_core.runtime.cache import HostCache
from apb_core.runtime.merge import merge_hosts
from kernels import DecodeAttention

WARMUP_STEPS = 2  # eager runs on a side stream before capture (allocator and NCCL set-up happen there)


@dataclass
class StaticDecodeCall:
    """The attention of one decode step over `caches` (one host's, or every host's of a process that runs
    several: engine.DecodeCall), shapes fixed by the caches' capacities.

    lengths[i]: [] long, the keys cache i held before the step; the writer (the last host) writes the new
    token's K/V there. comm: the collectives with other processes (None: none).
    """

    caches: list[HostCache]
    writer: int | None
    comm: Any  # apb_core.dist.comm.Comm | None
    lengths: list[torch.Tensor]
    attentions: list[DecodeAttention]
    masses: list[AttentionMass | None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        parts = []
        for i, cache in enumerate(self.caches):
            k_cache, v_cache = cache.k[layer], cache.v[layer]  # [B, Hkv, capacity, D]
            used = self.lengths[i].view(1)
            if i == self.writer:  # the new token is a key of its own query
                k_cache.index_copy_(2, used, k)
                v_cache.index_copy_(2, used, v)
                used = used + 1
            parts.append(self.attentions[i](q, k_cache, v_cache, used.to(torch.int32), scale))
        out, lse = merge_hosts(parts, self.comm, q.dtype)
        for mass in self.masses:
            if mass is not None:
                mass.add(layer, q, lse, scale)
        return out


class StaticDecoder:
    """One-token decode steps over the current caches of the engine's decode group (engine.decode_group):
    replayed from a CUDA graph when `graph`, else run eagerly with the same static code. Built after a
    prefill and the query phase (every process at the same point: capture runs the step's collectives);
    valid until the next prefill replaces the caches. The engines advance their own cache lengths."""

    def __init__(self, engine, graph: bool) -> None:
        device = engine.device
        self.engine = engine
        engines, comm = engine.decode_group()
        self.caches: list[HostCache] = [e.cache for e in engines]
        self.writer = next((i for i, e in enumerate(engines) if e.is_last), None)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.lengths = [torch.tensor(c.length, dtype=torch.long, device=device) for c in self.caches]
        attentions = [DecodeAttention(device, engine.dtype, engine.head_dim, c.capacity) for c in self.caches]
        self.call = StaticDecodeCall(self.caches, self.writer, comm, self.lengths, attentions,
                                     [e.mass for e in engines])
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if graph:
            self._capture()

    def _forward(self) -> torch.Tensor:
        return self.engine.forward_logits(self.ids, self.pos, self.call)

    def _capture(self) -> None:
        masses = [m for m in self.call.masses if m is not None]
        kept = [m.checkpoint() for m in masses]  # the query phase's row, before warm-up records more
        side = torch.cuda.Stream(self.engine.device)
        side.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):  # writes scratch K/V at the next free slot: the first real step overwrites it
                self._forward()
        torch.cuda.current_stream(self.engine.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        for mass, before in zip(masses, kept, strict=True):
            mass.restore(before)

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Run `token` at position `pos`; returns the last-token logits [V] fp32 (a buffer that the next step
        overwrites: read it before stepping again)."""
        if self.writer is not None:
            cache = self.caches[self.writer]
            if cache.length >= cache.capacity:
                raise RuntimeError(f"KV cache overflow: {cache.length + 1} > capacity {cache.capacity}")
        self.ids.fill_(token)
        self.pos.fill_(pos)
        for length, cache in zip(self.lengths, self.caches, strict=True):
            length.fill_(cache.length)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._forward()
