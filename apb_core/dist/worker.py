"""What one worker process does: join the group, load the model once, run jobs until told to stop.

There is one worker loop for every command. A worker runs one host, or H/W hosts that share its model and take
turns (`--workers W`, apb_core.dist.local_hosts). A job is any picklable object with
`run(host: Host, emit) -> result`: `apb ask`'s `AskJob` (apb_core.runtime.generate) and `apb bench`'s
`BenchJob` (apb_core.bench.host) both are, and so will the server's be. The same `Host` runs in this process
for one host or a torchrun rank (apb_core.dist.launcher.InlineHost).

Messages to the launcher on `events`: ("ready", rank, load_s) | ("event", Event) | ("result", rank, bytes) |
("error", rank, text).
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from apb_core.dist.env import Env, read_env
from apb_core.dist.failures import OOM_EXIT_CODE, describe, describe_oom, is_oom
from apb_core.dist.faults import Faults

PARENT_POLL_S = 0.2  # how soon a worker notices that its launcher is gone
STACK_SIGNAL = signal.SIGUSR1  # a worker writes every thread's Python stack to its stderr (APB_DEBUG=1 keeps it)


@dataclass
class WorkerSpec:
    """How every worker loads its model. `model`: local dir / .gguf / None (embedded); or `preset` for
    random weights of a named shape (bench). `env`: the launcher's reading of the environment."""

    model: str | None = None
    preset: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    retaining_heads: str | None = None
    allow_pickle: bool = False
    seed: int = 0
    decode: str = "auto"  # how one-token decode steps run (apb_core.runtime.engine.DECODE_MODES)
    timed: bool = False  # hosts sharing a process keep a ledger of their compute per collective (bench)
    env: Env = field(default_factory=read_env)


@dataclass
class Host:
    """A loaded host: its engine, the tokenizer (None for random-weight presets) and the run's faults. `cancel`:
    the launcher's cancel flag (runtime.generate.CancelFlag), the same object in every host of the run, which
    the last host reads before each token (None: nothing cancels)."""

    engine: Any  # apb_core.runtime.engine.HostEngine
    tokenizer: Any
    faults: Faults
    load_s: float
    cancel: Any = None


def device_for(spec: WorkerSpec, local_rank: int) -> torch.device:
    if spec.device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_group(rank: int, hosts: int, device: torch.device, init_method: str | None, timeout_s: float) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU); a no-op for one host."""
    if hosts <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=hosts, timeout=timedelta(seconds=timeout_s), **kwargs,
    )


def load_model(spec: WorkerSpec, device: torch.device) -> tuple[Any, Any]:
    """The model (random weights for a preset) with apb's attention, and its tokenizer (None for a preset)."""
    from transformers.utils import logging as hf_logging

    from apb_core import models
    from apb_core.runtime.engine import register_attention

    hf_logging.disable_progress_bar()  # stderr belongs to apb's own progress display
    hf_logging.set_verbosity_error()
    if spec.threads and device.type == "cpu":
        torch.set_num_threads(spec.threads)
    dtype = models.resolve_dtype(device, spec.dtype)
    name = register_attention()
    if spec.preset:
        return models.build_random_model(spec.preset, device, dtype, attn_implementation=name, seed=spec.seed), None
    source = models.resolve_model(spec.model, allow_pickle=spec.allow_pickle)
    model = models.load_model(source, device=device, dtype=dtype, attn_implementation=name)
    return model, models.load_tokenizer(source)


@dataclass
class LocalSet:
    """The hosts of this process: one (one host per process), or H/W sharing the model and taking turns
    (apb_core.dist.local_hosts). `run` runs a job on each and returns their results in rank order."""

    hosts: list[Host]
    turns: Any = None  # LocalHosts when several hosts share this process
    device: torch.device | None = None

    @property
    def first_rank(self) -> int:
        return self.hosts[0].engine.rank

    def run(self, job, emit) -> list:
        if self.turns is None:
            return [job.run(self.hosts[0], emit)]
        from apb_core.dist.local_hosts import run_in_turn

        device = self.device

        def set_device() -> None:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)

        return run_in_turn(self.turns, self.hosts, job, emit, set_device)


def load_hosts(spec: WorkerSpec, first: int, count: int, hosts: int, device: torch.device,
               outer: Any = None, cancel: Any = None) -> LocalSet:
    """Load the model once and build the engines of hosts first .. first + count - 1 of `hosts`. outer: the
    ProcessComm of the worker processes when several hosts share each of them (None: W = 1 or W = H).
    cancel: the launcher's cancel flag, given to every host (Host.cancel)."""
    from apb_core.dist.comm import ProcessComm
    from apb_core.dist.local_hosts import LocalHosts
    from apb_core.runtime.engine import HostEngine

    t0 = time.perf_counter()
    model, tokenizer = load_model(spec, device)
    turns = None
    if count == 1:
        comms = [ProcessComm(first, hosts)]
    else:
        turns = LocalHosts(hosts, first, count, device, spec.env.collective_timeout_s, outer, timed=spec.timed)
        comms = [turns.comm(i) for i in range(count)]
    engines = [HostEngine(model, first + i, hosts, comms[i], retaining_heads=spec.retaining_heads,
                          decode=spec.decode) for i in range(count)]
    faults = Faults.from_env(spec.env)
    load_s = time.perf_counter() - t0
    return LocalSet([Host(engine, tokenizer, faults, load_s, cancel) for engine in engines], turns, device)


def worker_main(index: int, hosts: int, workers: int, spec: WorkerSpec, init_method: str, jobs, events,
                cancel: Any = None) -> None:
    """Process entry (spawned or forked by the launcher): load, then run jobs until a None arrives. Worker
    `index` of `workers` runs hosts index * H/W .. (index + 1) * H/W - 1. `cancel`: the launcher's
    multiprocessing.Event (Workers.cancel), handed over at start so that fork and spawn both share it."""
    from apb_core.api import Event
    from apb_core.dist.comm import ProcessComm

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a setting for the tokenizers library, not one of apb's
    follow_parent(spec.env.debug)
    count = hosts // workers
    ranks = range(index * count, (index + 1) * count)
    local = job = None
    try:
        device = device_for(spec, index)
        for rank in ranks:
            events.put(("event", Event("phase", rank=rank, phase="load")))
        init_group(index, workers, device, init_method, spec.env.collective_timeout_s)
        for rank in ranks:
            Faults.from_env(spec.env).point("load", rank)
        outer = ProcessComm(index, workers) if count > 1 and workers > 1 else None
        local = load_hosts(spec, ranks[0], count, hosts, device, outer, cancel)
        for rank, host in zip(ranks, local.hosts, strict=True):
            events.put(("ready", rank, host.load_s))
        while True:
            job = jobs.get()
            if job is None:
                break
            results = local.run(job, lambda e: events.put(("event", e)))
            for rank, result in zip(ranks, results, strict=True):
                # pickled by value: torch's queue reducer would share tensor memory with a process that may exit
                events.put(("result", rank, pickle.dumps(result)))
    except KeyboardInterrupt:
        return
    except BaseException as exc:  # report any failure as one line; the parent ends the others
        rank = getattr(exc, "apb_rank", ranks[0])
        engine = local.hosts[rank - ranks[0]].engine if local is not None else None
        context = getattr(job, "context_len", None)
        text = describe_oom(exc, rank, hosts, engine, context) if is_oom(exc) else describe(exc, spec.env)
        try:
            events.put(("error", rank, text))
            events.close()
            events.join_thread()  # put() only hands the message to a feeder thread: let it reach the pipe
        finally:
            os._exit(OOM_EXIT_CODE if is_oom(exc) else 1)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def follow_parent(debug: bool) -> None:
    """Make this worker mind its launcher: Ctrl-C in a terminal reaches the whole process group, and only the
    launcher acts on it (it ends the workers with SIGTERM, whose default action works even inside a blocking
    collective); a forked worker must also drop the launcher's Python handlers. Its stderr goes to /dev/null
    unless `debug` (APB_DEBUG=1), where the launcher has a stuck worker write its stacks (STACK_SIGNAL) before
    it ends it. A daemon thread ends the worker when the launcher is gone (SIGKILLed launchers cannot stop
    their workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    faulthandler.register(STACK_SIGNAL, all_threads=True)  # the launcher's dump of a stuck worker (to fd 2)
    if not debug:
        # torch's C++ side (NCCL's watchdog and heartbeat monitor, TCPStore, gloo) writes warnings and stack
        # dumps straight to fd 2 when a peer goes away; the launcher reports a failure as one line instead
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    if mp.parent_process() is None:
        return
    release_fork_server()
    # the process that started this one: the launcher (fork, spawn) or multiprocessing's fork server
    # (forkserver), which exits when the launcher does
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:  # reparented to init (or a subreaper) once the launcher dies
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="apb-parent-watch", daemon=True).start()


def release_fork_server() -> None:
    """Close this worker's copy of the fork server's liveness pipe. multiprocessing hands it to every process
    the server starts (so that they may start processes of their own), and the server runs until every copy is
    closed: a worker holding one keeps the server alive after its launcher is SIGKILLed, and the server, its
    parent, keeps the worker from noticing. Workers start no processes. A forked worker holds the launcher's
    copy, if any: closing it is as right."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)  # multiprocessing's own (private) state, read defensively
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
