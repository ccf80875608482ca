"""Clocks that mean something on a GPU: device synchronisation, a barrier of every host, and phase timers.

CUDA kernels run asynchronously, so a wall-clock edge is only true after `sync`. A phase of a distributed
prefill runs from the moment every host can start to the moment the last one is done: `barrier` brackets it.
`PhaseTimer` (bench's breakdown mode) synchronises at every edge, which slows the run down; the engine's hot
path gets `NO_TIMER`, whose regions cost nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(device: torch.device, hosts: int, comm=None) -> None:
    """Every host's queued work done and every host here (`comm`: apb_core.dist.comm, needed when hosts > 1)."""
    sync(device)
    if hosts > 1:
        comm.barrier()
        sync(device)


class PhaseTimer:
    """Exclusive wall time per named region, device-synchronised at every edge (disabled: regions are free)."""

    def __init__(self, device: torch.device | None = None, enabled: bool = True) -> None:
        self.device = device or torch.device("cpu")
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [start, time spent in nested regions]

    def start(self) -> None:
        sync(self.device)
        self._stack.append([time.perf_counter(), 0.0])

    def stop(self, name: str) -> None:
        sync(self.device)
        start, nested = self._stack.pop()
        spent = time.perf_counter() - start
        self.totals[name] += spent - nested
        if self._stack:
            self._stack[-1][1] += spent

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop(name)

    def region(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._timed(name) if self.enabled else contextlib.nullcontext()

    def hook(self, model) -> list:
        """Time q/k/v projections, o-proj and the MLP of every decoder layer; returns the hook handles."""
        handles = []
        for layer in model.model.layers:
            attn = layer.self_attn
            for name, module in (("qkv", attn.q_proj), ("qkv", attn.k_proj), ("qkv", attn.v_proj),
                                 ("o-proj", attn.o_proj), ("ffn", layer.mlp)):
                handles.append(module.register_forward_pre_hook(lambda *_: self.start()))
                handles.append(module.register_forward_hook(lambda *_, n=name: self.stop(n)))
        return handles


NO_TIMER = PhaseTimer(enabled=False)  # stateless when disabled: safe to share
