"""In-process hosts (`--workers W`, W < H): H/W hosts run as threads of one worker process and take turns.

Why: APB's claims are about 4 and 8 hosts, and one GPU (or a 2-core CPU) must be able to run them with the
same math as 8 processes. Each host keeps its own engine and KV cache; the model's weights are shared.

Prefill runs each host's own forward. Decode runs one: every host feeds the same token through the same
weights, so local host 0 runs the forward and its attention reads every local host's cache and merges the
partials (`HostComm.lead`, engine.DecodeCall); the other hosts take its logits.

The schedule: exactly one host of the process computes at a time. Host 0 runs until its next collective,
deposits its part and hands the turn to host 1, and so on; the last host completes the collective (across
processes too, when W > 1, through the process group of the W workers) and hands the turn back to host 0,
which then finds the result. So the order of the work on the device is fixed, nothing runs concurrently, and
with `timed` (device synchronised at each hand-over) every host's compute between two collectives is known:
the ledger that `apb bench` turns into a projected H-device prefill time (apb_core.bench.projection).

A host that fails aborts the others (they raise `HostAborted` at their next wait); a host that waits longer
than the collective timeout for its turn raises a timeout, as gloo and NCCL would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from apb_core.dist.comm import ProcessComm


ABORT_GRACE_S = 1.0  # after a failure, how long the other hosts get to reach a collective and stop


class HostStuck(TimeoutError):
    """A host held its turn past the collective timeout (the others' wait timed out); `apb_rank`: that host."""


class HostAborted(RuntimeError):
    """Another host of this process failed: this one stops at its next collective."""


@dataclass
class Op:
    """One completed collective: its kind, the bytes each host sent, and each host's compute before it (s)."""

    kind: str
    send_bytes: int
    busy_s: list[float] = field(default_factory=list)


class LocalHosts:
    """The shared state of the hosts `first_rank .. first_rank + count - 1` of an H-host run in this process.

    outer: the process group of the W worker processes (None when W = 1). timed: synchronise `device` at every
    hand-over and keep the ledger (`ops`).
    """

    def __init__(self, hosts: int, first_rank: int, count: int, device: torch.device, timeout_s: float,
                 outer: ProcessComm | None = None, timed: bool = False) -> None:
        self.hosts, self.first_rank, self.count = hosts, first_rank, count
        self.device, self.timeout_s, self.outer, self.timed = device, timeout_s, outer, timed
        self.cond = threading.Condition()
        self.turn = 0  # the local index of the host that may compute now
        self.generation = 0  # collectives completed
        self.slots: list[Any] = [None] * count
        self.result: Any = None
        self.error: BaseException | None = None
        self.ops: list[Op] = []
        self.engines: list[Any] = [None] * count  # the hosts' engines, in local order (decode: one forward for all)
        self._clock = [0.0] * count  # when each host last got its turn
        self._busy = [0.0] * count  # its compute since its last collective

    def comm(self, local: int) -> HostComm:
        return HostComm(self, local)

    # the turn ---------------------------------------------------------------------------------------------
    def begin(self, local: int) -> None:
        """Wait for this host's first turn of a job (host 0 starts; the rest follow at host 0's first collective)."""
        with self.cond:
            self._wait(local, lambda: self.turn == local)
            self._start_clock(local)

    def end(self, local: int) -> None:
        """This host's job is done: pass the turn on (the last host gives it back to host 0 for the next job)."""
        with self.cond:
            self.turn = (local + 1) % self.count
            self.cond.notify_all()

    def abort(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    def reset(self) -> None:
        """Before a job: host 0's turn, no error, an empty ledger."""
        with self.cond:
            self.turn, self.error, self.slots, self.ops = 0, None, [None] * self.count, []

    def _wait(self, local: int, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not ready():
            if self.error is not None:
                raise HostAborted(f"host {self.first_rank + local} stopped: another host failed")
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = self.first_rank + self.turn
                err = HostStuck(f"host {stuck} is stuck: host {self.first_rank + local} waited {self.timeout_s:g} s "
                                "for its turn (in-process hosts; APB_COLLECTIVE_TIMEOUT sets the limit)")
                err.apb_rank = stuck  # type: ignore[attr-defined]
                self.error = self.error or err
                self.cond.notify_all()
                raise err
            self.cond.wait(left)
        if self.error is not None:
            raise HostAborted(f"host {self.first_rank + local} stopped: another host failed")

    def _start_clock(self, local: int) -> None:
        self._clock[local] = time.perf_counter()

    def _stop_clock(self, local: int) -> None:
        if self.timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._busy[local] = time.perf_counter() - self._clock[local]

    # collectives ------------------------------------------------------------------------------------------
    def collective(self, local: int, kind: str, part: Any, send_bytes: int,
                   complete: Callable[[list[Any]], Any]) -> Any:
        """Deposit `part`; the last host runs complete(parts in local order) -> the result every host gets."""
        with self.cond:
            self._stop_clock(local)
            generation = self.generation
            self.slots[local] = part
            if local == self.count - 1:
                try:
                    self.result = complete(self.slots)
                except BaseException as exc:
                    self.error = self.error or exc
                    self.cond.notify_all()
                    raise
                if self.timed:
                    self.ops.append(Op(kind, send_bytes, list(self._busy)))
                self.slots = [None] * self.count
                self.generation += 1
                self.turn = 0
            else:
                self.turn = local + 1
            self.cond.notify_all()
            self._wait(local, lambda: self.generation > generation and self.turn == local)
            result = self.result
            self._start_clock(local)
            return result

    def gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(parts)  # [count, ...]
        if self.outer is None:
            return stacked
        return self.outer.all_gather(stacked).reshape(self.hosts, *parts[0].shape)  # [W, count, ...] -> [H, ...]

    def pick(self, parts: list[torch.Tensor], src: int) -> torch.Tensor:
        owner, local = divmod(src, self.count)
        value = parts[local].clone() if owner * self.count == self.first_rank else parts[0].clone()
        if self.outer is not None:
            self.outer.broadcast(value, owner)
        return value

    def sync_all(self, parts: list[Any]) -> None:
        if self.outer is not None:
            self.outer.barrier()


class HostComm:
    """One in-process host's collectives (the `Comm` interface of apb_core.dist.comm)."""

    shares_process = True
    group = None  # no torch process group per host: ring and Ulysses cannot run on in-process hosts

    def __init__(self, local_hosts: LocalHosts, local: int) -> None:
        self.shared, self.local = local_hosts, local
        self.rank, self.hosts = local_hosts.first_rank + local, local_hosts.hosts

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        send = send.contiguous()
        nbytes = send.numel() * send.element_size()
        return self.shared.collective(self.local, "all_gather", send, nbytes, self.shared.gather)

    def broadcast(self, t: torch.Tensor, src: int) -> None:
        value = self.shared.collective(self.local, "broadcast", t, t.numel() * t.element_size(),
                                       lambda parts: self.shared.pick(parts, src))
        if self.rank != src:
            t.copy_(value)

    def barrier(self) -> None:
        self.shared.collective(self.local, "barrier", None, 0, self.shared.sync_all)

    def register(self, engine: Any) -> None:
        """The engine of this host (HostEngine registers itself): decode's one forward reads every local cache."""
        self.shared.engines[self.local] = engine

    def lead(self, forward: Callable[[], Any]) -> Any:
        """forward() run by local host 0 in its turn, its result returned to every host of the process: a
        decode step is the same forward on every host except the attention over each cache, which host 0's
        forward computes for all of them (engine.DecodeCall)."""
        part = forward() if self.local == 0 else None
        return self.shared.collective(self.local, "lead", part, 0, lambda parts: parts[0])


def run_in_turn(shared: LocalHosts, hosts: list[Any], job: Any, emit: Callable[[Any], None],
                set_device: Callable[[], None] = lambda: None) -> list[Any]:
    """Run `job.run(host, emit)` for every in-process host, one thread each, taking turns; results in local order.
    The first failure is re-raised (with the failing host's rank as `exc.apb_rank`) once the other hosts have
    stopped, or after ABORT_GRACE_S if one is stuck where it cannot see the abort (the caller, a worker process,
    then exits, and the stuck daemon thread with it)."""
    shared.reset()
    results: list[Any] = [None] * len(hosts)
    errors: list[tuple[int, BaseException]] = []

    def host_thread(local: int) -> None:
        set_device()  # the current CUDA device is per thread
        try:
            shared.begin(local)
            results[local] = job.run(hosts[local], emit)
            shared.end(local)
        except BaseException as exc:
            errors.append((local, exc))
            shared.abort(exc)

    threads = [threading.Thread(target=host_thread, args=(i,), name=f"apb-host-{shared.first_rank + i}", daemon=True)
               for i in range(len(hosts))]
    for t in threads:
        t.start()
    failed_at = None
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.05)
        if errors and failed_at is None:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > ABORT_GRACE_S:
            break  # a host stuck outside any collective never sees the abort: the worker process ends it
    if errors:
        first = [e for e in errors if not isinstance(e[1], HostAborted)] or errors
        local, exc = first[0]
        if not hasattr(exc, "apb_rank"):
            exc.apb_rank = shared.first_rank + local  # type: ignore[attr-defined]
        raise exc
    return results
