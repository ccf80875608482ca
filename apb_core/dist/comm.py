"""The collectives between hosts, behind one small interface.

APB needs three: an all-gather (each layer's passing blocks in prefill; each layer's partial outputs and
log-sum-exps in decode), a broadcast (the sampled token) and a barrier (timing edges). Two implementations:
- `ProcessComm`: one host per process, over torch.distributed (NCCL on GPUs, gloo on CPU);
- `apb_core.dist.local_hosts.LocalHosts`: several hosts as threads of one process that take turns
  (`--workers W` with W < H), with the same results.
Ring and Ulysses speak point-to-point and all-to-all, so they take the torch process group itself
(`Comm.group`), which only `ProcessComm` has.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist

_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Comm(Protocol):
    """The collectives of one host. Every host calls each of them, in the same order."""

    rank: int
    hosts: int
    group: Any  # the torch.distributed group of one-host-per-process runs (None: the default group)

    def all_gather(self, send: torch.Tensor) -> torch.Tensor: ...  # send [...] -> [hosts, ...] in rank order

    def broadcast(self, t: torch.Tensor, src: int) -> None: ...  # in place, from host `src`

    def barrier(self) -> None: ...

    @property
    def shares_process(self) -> bool: ...  # True: hosts take turns in one process (no CUDA graph capture)


class ProcessComm:
    """One host per process: torch.distributed over `group` (None: the default group, rank = host)."""

    shares_process = False

    def __init__(self, rank: int = 0, hosts: int = 1, group: Any = None) -> None:
        self.rank, self.hosts, self.group = rank, hosts, group

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        send = send.contiguous()
        out = send.new_empty((self.hosts * send.shape[0], *send.shape[1:]))  # the concatenated form (gloo wants it)
        _gather(out, send, group=self.group)
        return out.view(self.hosts, *send.shape)

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        src = dist.get_global_rank(self.group, src) if self.group is not None else src
        dist.broadcast(t, src=src, group=self.group)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def process_group(comm: Comm | None, method: str) -> Any:
    """The torch.distributed group for a method that needs one (ring, Ulysses): refused for in-process hosts."""
    if comm is not None and comm.shares_process:
        raise ValueError(f"{method} needs one process per host: run it with --workers equal to --hosts")
    return comm.group if comm is not None else None
