"""What one worker process does: join the group, load the model once, answer jobs until told to stop."""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = float(os.environ.get("APB_COLLECTIVE_TIMEOUT", "60"))


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
    from apb_core.generate import run_job

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        device = device_for(spec, rank)
        events.put(("event", Event("phase", rank=rank, phase="load")))
        init_group(rank, hosts, device, init_method)
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
        text = _describe(exc)
        try:
            events.put(("error", rank, text))
        finally:
            os._exit(1)
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _describe(exc: BaseException) -> str:
    if os.environ.get("APB_DEBUG"):
        import traceback

        return "".join(traceback.format_exception(exc))
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return f"out of memory: {str(exc).splitlines()[0][:300]}"
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"
