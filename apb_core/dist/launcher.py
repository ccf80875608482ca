"""Launcher: start H workers on this machine (or be one of torchrun's), feed them jobs, relay their events.

`start_hosts` picks the runner: `Workers` (H processes; the calling process loads no model, it watches them) or
`InlineHost` (the host runs in this process: one host, or one torchrun rank, where rank 0 reports). Both take
the same jobs (apb_core.dist.worker) and return one result per host. A worker that reports an error or dies
ends the run: every other worker is terminated (then killed) and the caller gets one WorkerError naming the
rank and the cause.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from apb_core.api import Event
from apb_core.dist.failures import OOM_EXIT_CODE, describe_oom, is_oom
from apb_core.dist.worker import STACK_SIGNAL, WorkerSpec, device_for, init_group, load_hosts, worker_main
from apb_core.errors import WorkerError

POLL_S = 0.1
GRACE_S = 3.0
# the decode watchdog waits this long past the collective timeout, so that a collective that timed out (gloo: on
# the waiting ranks) reports first and names the stuck worker; NCCL's may report much later or not at all
DECODE_GRACE_S = 2.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_start_method(device: str) -> str:
    """fork on Linux: workers start in milliseconds with torch and transformers already imported (on the GPU
    machine, where imports read a slow file system, spawned workers spent most of their 17 s start importing).
    That needs a launcher that has run no torch compute and creates no CUDA context before it forks: a CUDA
    context does not survive a fork (where one exists already, spawn), and a process that ran torch's CPU
    kernels on several threads leaves OpenMP/MKL state that can hang a forked child in its first kernel (seen:
    a worker stuck in einsum). `apb ask` and `apb bench` fork before any compute (the GGUF conversion runs in
    its own process); a launcher that starts workers again after it computed (`apb serve`'s restarts, `apb eval`'s
    next host count, the tests) passes forkserver: workers fork from a clean server process that imported the
    worker module once (its first start costs that import: 2 s on a 2-core CPU machine)."""
    if not sys.platform.startswith("linux"):
        return "spawn"
    if device == "cuda":
        import torch

        if torch.cuda.is_initialized():
            return "spawn"
    return "fork"


class Workers:
    """W worker processes (`worker_main`) running H hosts (W = H by default; W < H: H/W hosts per process that
    take turns, apb_core.dist.local_hosts) that keep their model loaded across jobs. Use as a context manager;
    `start()` first lets the caller work (read and tokenize the document) while the workers import and load.

    `cancel`: a multiprocessing.Event every worker holds from its start: set, it ends the running job's decode
    on every host at the same token (runtime.generate.decode: the last host reads it); the caller clears it
    before a job (the server, apb_core.serve.engine, sets it when a client goes away)."""

    name = "apb-worker"

    def __init__(self, spec: WorkerSpec, hosts: int, on_event: Callable[[Event], None] | None = None,
                 start_method: str | None = None, workers: int | None = None) -> None:
        self.spec, self.hosts = spec, hosts
        self.workers = workers or hosts
        if self.workers < 1 or hosts % self.workers:
            raise ValueError(f"--workers {self.workers} must divide --hosts {hosts}")
        self.per_worker = hosts // self.workers
        self.timeout_s = spec.env.collective_timeout_s
        self.on_event = on_event or (lambda e: None)
        # APB_START_METHOD (the user's) over the caller's choice over the default
        method = spec.env.start_method or start_method or default_start_method(spec.device)
        self.ctx = mp.get_context(method)
        if method == "forkserver":
            self.ctx.set_forkserver_preload(["apb_core.dist.worker"])
        self.cancel = self.ctx.Event()
        self.procs: list[mp.process.BaseProcess] = []
        self.load_s: list[float] = [0.0] * hosts
        self.ready = False

    def start(self) -> Workers:
        """Start the processes and return at once (idempotent); `__enter__` or `run` waits until they are ready.
        A caller that starts them and then fails must call `__exit__` (or `stop`)."""
        if self.procs:
            return self
        self.events = self.ctx.Queue()
        self.jobs = [self.ctx.Queue() for _ in range(self.workers)]
        init_method = f"tcp://127.0.0.1:{free_port()}"
        try:  # a failure or Ctrl-C while starting must not leave workers behind: `with` calls no __exit__ here
            for index in range(self.workers):
                p = self.ctx.Process(
                    target=worker_main,
                    args=(index, self.hosts, self.workers, self.spec, init_method, self.jobs[index], self.events,
                          self.cancel),
                    name=f"{self.name}-{index}", daemon=True,
                )
                p.start()
                self.procs.append(p)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __enter__(self) -> Workers:
        self.start()
        try:  # a failure or Ctrl-C while loading must not leave workers behind: `with` calls no __exit__ here
            self.wait_ready()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def wait_ready(self) -> None:
        """Block until every worker has loaded its model (once)."""
        if not self.ready:
            for rank, load_s in self._collect("ready").items():
                self.load_s[rank] = load_s
            self.ready = True

    def run(self, job) -> list:
        """Send one job to every worker; returns their results in rank order."""
        self.wait_ready()
        for q in self.jobs:
            q.put(job)
        results = self._collect("result")
        return [pickle.loads(results[r]) for r in range(self.hosts)]

    def _collect(self, kind: str) -> dict:
        got: dict = {}
        started, first_at = time.monotonic(), None
        layers, moved = [0] * self.hosts, [started] * self.hosts  # prefill layers each rank reported, and when
        token_at: float | None = None  # when rank 0 last reported an answer token
        while len(got) < self.hosts:
            if first_at is not None:
                self._check_stragglers(kind, got, first_at, first_at - started)
            self._check_progress(layers, moved)
            self._check_decode(token_at)
            try:
                msg = self.events.get(timeout=POLL_S)
            except queue.Empty:
                self._check_alive()
                continue
            if msg[0] == "event":
                event = msg[1]
                if event.kind == "progress" and event.phase == "prefill" and 0 <= event.rank < self.hosts:
                    layers[event.rank] += 1
                    moved[event.rank] = time.monotonic()
                elif event.kind == "progress" and event.phase == "decode":
                    token_at = time.monotonic()
                self.on_event(event)
            elif msg[0] == "error":
                self._fail(msg[1], msg[2])
            elif msg[0] == kind:
                got[msg[1]] = msg[2]
                first_at = first_at or time.monotonic()
        return got

    def _check_stragglers(self, kind: str, got: dict, first_at: float, first_took: float) -> None:
        """The watchdog for a worker stuck outside any collective (where no collective timeout can end it):
        once one worker is ready (or done), the others get as long again, and at least the collective
        timeout, to follow."""
        if time.monotonic() - first_at > max(self.timeout_s, first_took):
            missing = [r for r in range(self.hosts) if r not in got]
            self._dump_stacks(missing)
            self.stop()
            what = "loading the model" if kind == "ready" else "answering"
            raise WorkerError(
                f"worker {missing[0]} is stuck: still {what} {max(self.timeout_s, first_took):g} s after "
                f"worker {min(got)} finished (APB_COLLECTIVE_TIMEOUT sets the limit)"
            )

    def _check_progress(self, layers: list[int], moved: list[float]) -> None:
        """The watchdog for a worker stuck in prefill where the collective timeout does not end the others
        (NCCL enqueues every layer's collective and waits on the GPU): a rank two or more layers behind
        another that has not moved for the collective timeout is stuck. Over gloo no rank gets that far
        ahead: its collective waits for the slow rank, and times out."""
        lead = max(layers)
        for rank, done in enumerate(layers):
            if lead - done >= 2 and time.monotonic() - moved[rank] > self.timeout_s:
                self._dump_stacks([rank])
                self.stop()
                raise WorkerError(
                    f"worker {rank} is stuck: no progress for {self.timeout_s:g} s at prefill layer {done} "
                    f"while worker {layers.index(lead)} reached layer {lead} (APB_COLLECTIVE_TIMEOUT sets the limit)"
                )

    def _check_decode(self, token_at: float | None) -> None:
        """The watchdog for a worker stuck in an answer: over NCCL the other ranks' collectives wait on the GPU
        and their host threads block in the next synchronisation, where no timeout of theirs ends them promptly
        (NCCL's own watchdog aborts much later). Rank 0 reports the start of each answer (token 0: the query
        phase follows) and every token, and a token takes milliseconds: nothing new for the collective timeout
        (plus DECODE_GRACE_S) means a stuck worker."""
        if token_at is not None and time.monotonic() - token_at > self.timeout_s + DECODE_GRACE_S:
            self._dump_stacks(range(self.hosts))
            self.stop()
            raise WorkerError(
                f"a worker is stuck: no answer token for {self.timeout_s + DECODE_GRACE_S:g} s in decode "
                "(APB_COLLECTIVE_TIMEOUT sets the limit)"
            )

    def _died(self, index: int) -> WorkerError:
        """The error for worker process `index` that died without a word (named by its first host's rank)."""
        rank = index * self.per_worker
        code = self.procs[index].exitcode
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        alive = [str(r) for r, p in enumerate(self.procs) if p.exitcode is None]
        if code == -signal.SIGKILL:  # what the kernel's OOM killer (or a cgroup memory limit) sends
            why += ": probably out of memory (the kernel's OOM killer sends SIGKILL)"
        elif code == OOM_EXIT_CODE:
            why = "out of memory"
        if code in (-signal.SIGKILL, OOM_EXIT_CODE):
            why += "; use fewer hosts, a shorter document or --len, or a smaller model"
        elif code == -signal.SIGABRT and alive:  # what NCCL's watchdog does to a worker whose collective timed out
            why += (f": aborted, e.g. by NCCL after {self.timeout_s:g} s in a collective; worker(s) "
                    f"{', '.join(alive)} still running")
        who = f"worker {rank}" if self.per_worker == 1 else (
            f"worker process {index} (hosts {rank}-{rank + self.per_worker - 1})")
        return WorkerError(f"{who} died ({why})")

    def _fail(self, rank: int, text: str) -> None:
        """Stop every worker and raise one WorkerError naming the cause, which is not always the first report:
        a worker that dies without a word (os._exit, SIGKILL) or hangs makes the others fail in a collective
        (connection closed, timeout), and hosts that run out of memory do so together."""
        errors = {rank: text}
        waiting = "waiting for another worker" in text
        deadline = time.monotonic() + (1.0 if waiting else 0.3)
        while time.monotonic() < deadline:
            try:
                msg = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if msg[0] == "error":
                errors.setdefault(msg[1], msg[2])
        failed = {r // self.per_worker for r in errors}  # worker processes, by index
        silent = [i for i, p in enumerate(self.procs) if p.exitcode is not None and i not in failed]
        stuck = [i * self.per_worker for i, p in enumerate(self.procs) if p.exitcode is None and i not in failed]
        if silent:
            died = self._died(silent[0])
            self.stop()
            raise died
        if waiting and stuck:
            self._dump_stacks(stuck)
            self.stop()
            raise WorkerError(
                f"worker {stuck[0]} is stuck: worker {rank} timed out after {self.timeout_s:g} s waiting for "
                "it in a collective (APB_COLLECTIVE_TIMEOUT sets the limit)"
            )
        self.stop()
        oom = sorted(r for r, t in errors.items() if r != rank and t.startswith("out of memory"))
        also = f" (host(s) {', '.join(map(str, oom))} ran out too)" if text.startswith("out of memory") and oom else ""
        raise WorkerError(f"worker {rank} failed: {text}{also}")

    def _dump_stacks(self, ranks) -> None:
        """Have the workers of `ranks` (stuck ones) write their Python stacks to stderr before they are ended:
        what a user who reports a hang (under APB_DEBUG=1, where workers keep their stderr) can send us."""
        if not self.spec.env.debug:
            return
        for index in sorted({r // self.per_worker for r in ranks}):
            if self.procs[index].exitcode is None:
                try:
                    os.kill(self.procs[index].pid, STACK_SIGNAL)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)

    def _check_alive(self) -> None:
        for index, p in enumerate(self.procs):
            if p.exitcode is not None:
                # give its error message (if any) a moment to arrive before reporting a bare death
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    try:
                        msg = self.events.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if msg[0] == "error":
                        self._fail(msg[1], msg[2])
                died = self._died(index)
                self.stop()
                raise died

    def stop(self) -> None:
        """End every worker now: SIGTERM, then SIGKILL after a short grace period."""
        for p in self.procs:
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except (ProcessLookupError, TypeError):
                    pass
        deadline = time.monotonic() + GRACE_S
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join(timeout=1.0)

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            for q in self.jobs:
                q.put(None)
            deadline = time.monotonic() + 10.0
            for p in self.procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        self.stop()
        for q in [self.events, *self.jobs]:
            q.cancel_join_thread()
            q.close()


class InlineHost:
    """The host in this process (no start-up cost): one host, or one torchrun rank (rank 0 reports events).
    `cancel` as Workers' (a threading.Event: the host runs in this process; under torchrun every rank holds its
    own, and only the last rank's counts)."""

    def __init__(self, spec: WorkerSpec, on_event: Callable[[Event], None] | None = None) -> None:
        torchrun = spec.env.torchrun
        self.rank = torchrun.rank if torchrun else 0
        self.hosts = torchrun.world_size if torchrun else 1
        self.local_rank = torchrun.local_rank if torchrun else 0
        self.spec = spec
        self.on_event = (on_event or (lambda e: None)) if self.rank == 0 else (lambda e: None)
        self.load_s = [0.0]
        self.host = None
        self.cancel = threading.Event()

    def start(self) -> InlineHost:
        """Nothing to start ahead: the host loads in this process, in `__enter__` (the same interface as Workers)."""
        return self

    def __enter__(self) -> InlineHost:
        if self.host is not None:
            return self
        device = device_for(self.spec, self.local_rank)
        init_group(self.rank, self.hosts, device, "env://", self.spec.env.collective_timeout_s)
        try:
            self.host = load_hosts(self.spec, self.rank, 1, self.hosts, device, cancel=self.cancel).hosts[0]
        except Exception as exc:
            if not is_oom(exc):
                raise
            raise WorkerError(describe_oom(exc, self.rank, self.hosts, None, None)) from None
        self.load_s = [self.host.load_s]
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        self.host = None
        if self.hosts > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def run(self, job) -> list:
        """Run one job here; returns [result] (this rank's)."""
        try:
            return [job.run(self.host, self.on_event)]
        except Exception as exc:  # the same one line as a worker's
            if not is_oom(exc):
                raise
            context = getattr(job, "context_len", None)
            raise WorkerError(describe_oom(exc, self.rank, self.hosts, self.host.engine, context)) from None


def start_hosts(spec: WorkerSpec, hosts: int, on_event: Callable[[Event], None] | None = None,
                workers: int | None = None, start_method: str | None = None) -> Workers | InlineHost:
    """The runner for `hosts` hosts: this process for one host or under torchrun, else `workers` worker
    processes (default: one per host) started with `start_method` (default: `default_start_method`)."""
    if hosts == 1 or spec.env.torchrun is not None:
        return InlineHost(spec, on_event)
    return Workers(spec, hosts, on_event, start_method, workers)
