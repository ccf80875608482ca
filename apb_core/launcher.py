"""Launcher: start H workers on this machine (or join torchrun's), feed them jobs, relay their events.

The calling process loads no model: it watches the workers. A worker that reports an error or dies ends the
run: every other worker is terminated (then killed) and the caller gets one WorkerError naming the rank and
the cause. Under torchrun (RANK/WORLD_SIZE set) each process is itself a worker and rank 0 reports.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import sys
import time
from collections.abc import Callable

from apb_core.api import Event
from apb_core.errors import WorkerError
from apb_core.worker import WorkerSpec, worker_main

POLL_S = 0.1
GRACE_S = 3.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def default_start_method(device: str) -> str:
    """fork on CPU (workers start in milliseconds, with torch and transformers already imported: this process
    runs no torch compute, the GGUF conversion happens in its own process), spawn for CUDA (a CUDA context
    does not survive fork)."""
    return "fork" if device == "cpu" and sys.platform.startswith("linux") else "spawn"


class Workers:
    """H worker processes that keep their model loaded across jobs. Use as a context manager."""

    def __init__(self, spec: WorkerSpec, hosts: int, on_event: Callable[[Event], None] | None = None,
                 start_method: str | None = None) -> None:
        self.spec, self.hosts = spec, hosts
        self.on_event = on_event or (lambda e: None)
        method = start_method or os.environ.get("APB_START_METHOD") or default_start_method(spec.device)
        self.ctx = mp.get_context(method)
        self.procs: list[mp.process.BaseProcess] = []
        self.load_s: list[float] = [0.0] * hosts

    def __enter__(self) -> Workers:
        self.events = self.ctx.Queue()
        self.jobs = [self.ctx.Queue() for _ in range(self.hosts)]
        init_method = f"tcp://127.0.0.1:{free_port()}"
        for rank in range(self.hosts):
            p = self.ctx.Process(
                target=worker_main, args=(rank, self.hosts, self.spec, init_method, self.jobs[rank], self.events),
                name=f"apb-worker-{rank}", daemon=True,
            )
            p.start()
            self.procs.append(p)
        ready = self._collect("ready")
        for rank, load_s in ready.items():
            self.load_s[rank] = load_s
        return self

    def run(self, job) -> list:
        """Send one job to every worker; returns their JobResults in rank order."""
        for q in self.jobs:
            q.put(job)
        results = self._collect("result")
        return [pickle.loads(results[r]) for r in range(self.hosts)]

    def _collect(self, kind: str) -> dict:
        got: dict = {}
        while len(got) < self.hosts:
            try:
                msg = self.events.get(timeout=POLL_S)
            except queue.Empty:
                self._check_alive()
                continue
            if msg[0] == "event":
                self.on_event(msg[1])
            elif msg[0] == "error":
                self.stop()
                raise WorkerError(f"worker {msg[1]} failed: {msg[2]}")
            elif msg[0] == kind:
                got[msg[1]] = msg[2]
        return got

    def _check_alive(self) -> None:
        for rank, p in enumerate(self.procs):
            if p.exitcode is not None:
                # give its error message (if any) a moment to arrive before reporting a bare death
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    try:
                        msg = self.events.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if msg[0] == "error":
                        self.stop()
                        raise WorkerError(f"worker {msg[1]} failed: {msg[2]}")
                self.stop()
                code = p.exitcode
                why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                raise WorkerError(f"worker {rank} died ({why})")

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
