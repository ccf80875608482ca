"""Fault injection for the reliability tests: make one worker raise, exit, hang or run out of memory.

`APB_FAULT="rank=1,phase=prefill,kind=raise"` arms one fault (read by the launcher through apb_core.dist.env
and handed to every worker as `Faults`). The runtime calls `faults.point(phase, rank)` at its phase boundaries:

- "load": a worker has joined the process group and is about to read the weights (worker.py);
- "prefill": every host has passed the barrier before prefill, the others go on into the first layer's
  collectives (runtime/generate.py);
- "decode": the first generated token has been broadcast, the others go on into the next step (generate.py).

kinds: raise (RuntimeError), exit (os._exit(3), no message), kill (SIGKILL to itself), hang (sleeps until
killed, while the other hosts wait for it in a collective), oom (torch.OutOfMemoryError worded like the CUDA
allocator's). `rank` may be omitted or `*` for every rank.

`APB_FAULT_MARKER=DIR` makes every `point` call write `DIR/<phase>-<rank>` holding the worker's pid,
armed or not, so a test can tell which phase a run has reached and which processes are its workers.
With neither variable set a call costs two attribute checks.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from apb_core.dist.env import Env

PHASES = ("load", "prefill", "decode")
KINDS = ("raise", "exit", "kill", "hang", "oom")
EXIT_CODE = 3  # what kind=exit exits with


@dataclass(frozen=True)
class Fault:
    phase: str
    kind: str
    rank: int | None = None  # None: every rank


class InjectedFault(RuntimeError):
    """What kind=raise raises."""


def parse_fault(text: str) -> Fault | None:
    """`"rank=1,phase=prefill,kind=raise"` -> Fault; "" -> None. Raises ValueError on anything else."""
    if not text.strip():
        return None
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("rank", "phase", "kind"):
            raise ValueError(f"APB_FAULT: expected rank=N,phase=P,kind=K, got {text!r}")
        fields[key.strip()] = value.strip()
    phase, kind, rank = fields.get("phase", ""), fields.get("kind", ""), fields.get("rank", "*")
    if phase not in PHASES:
        raise ValueError(f"APB_FAULT: phase must be one of {', '.join(PHASES)} (got {phase!r})")
    if kind not in KINDS:
        raise ValueError(f"APB_FAULT: kind must be one of {', '.join(KINDS)} (got {kind!r})")
    return Fault(phase, kind, None if rank in ("", "*") else int(rank))


@dataclass(frozen=True)
class Faults:
    """The armed fault (if any) and the marker directory (if any) of one run."""

    fault: Fault | None = None
    marker_dir: str | None = None

    @classmethod
    def from_env(cls, env: Env) -> Faults:
        """From APB_FAULT / APB_FAULT_MARKER; a malformed APB_FAULT raises ValueError."""
        return cls(parse_fault(env.fault), env.fault_marker)

    def point(self, phase: str, rank: int) -> None:
        """Mark that `rank` reached `phase`; fire the armed fault if it is for this rank and phase."""
        if self.marker_dir:
            _write_marker(self.marker_dir, f"{phase}-{rank}")
        fault = self.fault
        if fault is None or fault.phase != phase or fault.rank not in (None, rank):
            return
        fire(fault, rank)


NO_FAULTS = Faults()


def fire(fault: Fault, rank: int) -> None:
    """Do what `fault.kind` says, now."""
    where = f"injected fault: rank {rank} {fault.kind} in {fault.phase}"
    if fault.kind == "raise":
        raise InjectedFault(where)
    if fault.kind == "exit":
        os._exit(EXIT_CODE)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "oom":
        import torch

        # the CUDA caching allocator's wording, so the worker's out-of-memory message is tested on CPU too
        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB. GPU {rank} has a total capacity of 79.19 GiB of "
            "which 1.25 GiB is free. Including non-PyTorch memory, this process has 77.93 GiB memory in use. Of "
            "the allocated memory 76.10 GiB is allocated by PyTorch, and 1.20 GiB is reserved by PyTorch but "
            f"unallocated. ({where})"
        )
    while True:  # hang: only a signal ends this
        time.sleep(3600)


def _write_marker(directory: str, name: str) -> None:
    try:
        tmp = os.path.join(directory, f".{name}.{os.getpid()}")
        with open(tmp, "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(tmp, os.path.join(directory, name))  # a reader never sees a half-written pid
    except OSError:
        pass
