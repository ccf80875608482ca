"""What one worker process does: join the group, load the model once, answer jobs until told to stop."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import re
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = float(os.environ.get("APB_COLLECTIVE_TIMEOUT", "60"))
PARENT_POLL_S = 0.2  # how soon a worker notices that its launcher is gone


@dataclass
class WorkerSpec:
    """How every worker loads its model. `model`: local dir / .gguf / None (embedded); or `preset` for
    random weights of a named shape (bench)."""

    model: str | None = None
    preset: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    retaining_heads: str | None = None
    allow_pickle: bool = False
    seed: int = 0


def device_for(spec: WorkerSpec, local_rank: int) -> torch.device:
    if spec.device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_group(rank: int, hosts: int, device: torch.device, init_method: str | None) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU); a no-op for one host."""
    if hosts <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=hosts,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S), **kwargs,
    )


def load_host(spec: WorkerSpec, rank: int, hosts: int, device: torch.device):
    """(engine, tokenizer, load seconds) for this host."""
    from apb_core import model as models
    from apb_core.engine import HostEngine, register_attention

    t0 = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr belongs to apb's own progress display
    hf_logging.set_verbosity_error()
    if spec.threads and device.type == "cpu":
        torch.set_num_threads(spec.threads)
    dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, None: None}[spec.dtype]
    name = register_attention()
    if spec.preset:
        model = models.build_random_model(spec.preset, device, dtype, attn_implementation=name, seed=spec.seed)
        tokenizer = None
    else:
        source = models.resolve_model(spec.model, allow_pickle=spec.allow_pickle)
        model = models.load_model(source, device=device, dtype=dtype, attn_implementation=name)
        tokenizer = models.load_tokenizer(source)
    engine = HostEngine(model, rank, hosts, retaining_heads=spec.retaining_heads)
    return engine, tokenizer, time.perf_counter() - t0


def worker_main(rank: int, hosts: int, spec: WorkerSpec, init_method: str, jobs, events) -> None:
    """Process entry (spawned by the launcher). Messages to the parent on `events`:
    ("ready", rank, load_s) | ("event", Event) | ("result", rank, JobResult) | ("error", rank, text)."""
    from apb_core.api import Event
    from apb_core.faults import fault_point
    from apb_core.generate import run_job

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _follow_parent()
    engine = job = None
    try:
        device = device_for(spec, rank)
        events.put(("event", Event("phase", rank=rank, phase="load")))
        init_group(rank, hosts, device, init_method)
        fault_point("load", rank)
        engine, tokenizer, load_s = load_host(spec, rank, hosts, device)
        events.put(("ready", rank, load_s))
        while True:
            job = jobs.get()
            if job is None:
                break
            result = run_job(engine, job, tokenizer, emit=lambda e: events.put(("event", e)))
            # pickled by value: torch's queue reducer would share tensor memory with a process that may exit
            events.put(("result", rank, pickle.dumps(result)))
    except KeyboardInterrupt:
        return
    except BaseException as exc:  # report any failure as one line; the parent ends the others
        text = describe_oom(exc, rank, hosts, job, engine) if is_oom(exc) else _describe(exc)
        try:
            events.put(("error", rank, text))
            events.close()
            events.join_thread()  # put() only hands the message to a feeder thread: let it reach the pipe
        finally:
            os._exit(1)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _follow_parent() -> None:
    """Make this worker mind its launcher: Ctrl-C in a terminal reaches the whole process group, and only the
    launcher acts on it (it ends the workers with SIGTERM, whose default action works even inside a blocking
    collective); a forked worker must also drop the launcher's Python handlers. Its stderr goes to /dev/null
    (APB_DEBUG=1 keeps it). A daemon thread ends the worker when the launcher is gone (SIGKILLed launchers
    cannot stop their workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not os.environ.get("APB_DEBUG"):
        # torch's C++ side (NCCL's watchdog and heartbeat monitor, TCPStore, gloo) writes warnings and stack
        # dumps straight to fd 2 when a peer goes away; the launcher reports a failure as one line instead
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    parent = mp.parent_process()
    if parent is None:
        return
    launcher = parent.pid

    def watch() -> None:
        while os.getppid() == launcher:  # reparented to init (or a subreaper) once the launcher dies
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="apb-parent-watch", daemon=True).start()


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is the device (or allocator) running out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


_GIB = {"B": 2**-30, "KiB": 2**-20, "MiB": 2**-10, "GiB": 1.0, "TiB": 2**10}


def _gib(pattern: str, text: str) -> float | None:
    m = re.search(pattern + r" ([\d.]+) (B|KiB|MiB|GiB|TiB)", text)
    return float(m.group(1)) * _GIB[m.group(2)] if m else None


# Activation values per token of one layer's prefill, in units of (hidden + intermediate): calibrated on an H200
# (random 1.1B llama, bf16, 2 hosts, ~12 GiB left free by another process): the largest document that fit had
# 186K-215K tokens; with the ~9.5 GiB of room that run had this predicts ~189K, while the linear estimate from
# the failed allocation alone said 331K after a 373K-token failure.
ACTIVATION_FACTOR = 5.0


def describe_oom(exc: BaseException, rank: int, hosts: int, job, engine) -> str:
    """One line for an out-of-memory error on host `rank`: what it was doing, and roughly what would fit.

    Sizes come from the CUDA allocator's message (else from the device). Two estimates of the context that
    would fit, the smaller one is reported:
    - linear: what is ours beyond weights and the CUDA context grows with the context, and needed at least
      in use + requested: fit = context * room / (in use + requested - weights - overhead). An upper bound:
      the allocation that failed is rarely the last one the prefill needs;
    - per token: this host's tokens cost the KV cache plus ACTIVATION_FACTOR * (hidden + intermediate) values.
    room = min(capacity, in use + free) - weights - overhead (memory of this process that torch does not hold).
    """
    device = engine.device if engine is not None else None
    where = f"host {rank} of {hosts}" + (f" ({device})" if device is not None else "")
    if job is None or engine is None:
        return (f"out of memory on {where} while loading the model: its weights do not fit; use a smaller "
                "model or a device with more memory")
    context = len(job.prompt.context_ids)
    line = f"out of memory on {where} with a {context}-token context"
    text = str(exc)
    capacity, requested = _gib("total capacity of", text), _gib("Tried to allocate", text)
    in_use = _gib("this process has", text) or _gib("Of the allocated memory", text)
    if device is not None and device.type == "cuda":
        capacity = capacity or torch.cuda.get_device_properties(device).total_memory / 2**30
        in_use = in_use or torch.cuda.max_memory_allocated(device) / 2**30
    free = _gib("of which", text)
    if capacity and in_use and free is not None:  # other processes on the GPU: only what is ours or free counts
        capacity = min(capacity, in_use + free)
    allocated, cached = _gib("Of the allocated memory", text), _gib("is allocated by PyTorch, and", text)
    overhead = max(0.0, in_use - allocated - cached) if in_use and allocated and cached is not None else 0.0
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 2**30
    room = (capacity or 0.0) - weights - overhead
    if room > 0 and in_use and requested is not None and in_use + requested - weights - overhead > 0:
        ratio = min(1.0, room / (in_use + requested - weights - overhead))
        cfg, plan = engine.model.config, engine.plan
        held = plan.anchor_len + plan.block_len + plan.probe_len if plan is not None else -(-context // hosts)
        per_token = engine.dtype.itemsize * (
            2 * engine.layers * engine.kv_heads * engine.head_dim
            + ACTIVATION_FACTOR * (cfg.hidden_size + getattr(cfg, "intermediate_size", 4 * cfg.hidden_size))
        ) / 2**30
        ratio = min(ratio, room / (max(held, 1) * per_token))
        line += (f"; about {int(context * ratio)} context tokens would fit on {hosts} host(s), or this document on "
                 f"about {math.ceil(hosts / ratio)} hosts")
    return line + "; use more hosts, --truncate, or a shorter document"


def _describe(exc: BaseException) -> str:
    if os.environ.get("APB_DEBUG"):
        import traceback

        return "".join(traceback.format_exception(exc))
    first = (str(exc).splitlines() or [""])[0]
    if isinstance(exc, RuntimeError) and "timed out" in first.lower():  # gloo/NCCL collective timeout
        return (f"timed out after {COLLECTIVE_TIMEOUT_S:g} s waiting for another worker in a collective "
                "(it is stuck or died; APB_COLLECTIVE_TIMEOUT sets the limit)")
    return f"{type(exc).__name__}: {first[:300]}"
