"""`apb bench`: prefill and decode speed of APB against its baselines on the same random prompt, same hosts.

Every method but `hf` is a prefill strategy of the same engine (apb_core/bench/host.py), so the model code,
the KV cache and the decode loop are the ones `apb ask` runs and only the attention of prefill differs:

| method    | hosts | layout                                   | attention in prefill                              |
|-----------|-------|------------------------------------------|---------------------------------------------------|
| hf        | 1     | plain transformers in the calling process | its own sdpa (`model(...)`, `generate`), no apb  |
| single    | 1     | the whole context on rank 0              | causal (the others wait: "one GPU")               |
| ring      | H     | zigzag chunks r and 2H-1-r (ring.py)     | exact, K/V passed around a ring with P2P          |
| ulysses   | H     | contiguous blocks (ulysses.py)           | exact, all-to-all to heads and back               |
| full      | H     | contiguous blocks                        | exact, APB machinery with every earlier KV passed |
| star      | H     | blocks, anchor = the whole first block   | approximate (Star Attention phase 1)              |
| apb       | H     | blocks, anchor l_a with the query, l_p   | approximate (APB)                                 |

What is timed (paper section 10, tightened): each prefill is bracketed by device synchronisation and a
barrier of all hosts, so it runs from the moment every host can start to the moment the last one is done.
One warm-up, then the median of `repeat` runs. After the last run the query (32 tokens) and `decode_tokens`
greedy tokens are decoded at that context; each token's time covers the last host's argmax, its broadcast
and one forward on every host. Random token ids (seeded) are fed to every method, so the exact methods'
logits can be compared with `single` (tests/test_bench.py does). `full` means what it means in `apb ask`:
exact attention over H hosts.

`hf` is the reference a user has without apb: the same weights loaded by plain transformers in the calling
process after the workers have exited (all cores or `--threads` x hosts), prefill timed as one
`model(context, logits_to_keep=1)` call, decode as `generate` (time to first token, then per token).

FLOPs: `effective` counts what exact causal attention over the context costs (linear layers 2·params per
token, attention 4·Hq·d per query-key pair over N(N+1)/2 pairs, LM head excluded), so a method that skips
work shows more than the hardware does; `executed` counts the pairs each method's mask allows and the tokens
each host really projects (anchor, probe, zigzag chunks).

Breakdown mode (off in the timed runs): one more prefill with synchronising timers (bench/host.py).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from apb_core.algorithm.flops import ModelDims
from apb_core.api import Event
from apb_core.bench.host import INSERT_AT, QUERY_LEN, BenchJob, HostRun
from apb_core.bench.projection import PROJECTED_LINK_GIBPS
from apb_core.bench.report import summarise
from apb_core.dist.env import read_env
from apb_core.dist.launcher import start_hosts
from apb_core.dist.worker import WorkerSpec
from apb_core.errors import InputError
from apb_core.runtime.timing import sync

METHODS = ("hf", "single", "ring", "ulysses", "full", "star", "apb")
DEFAULT_METHODS = ("single", "ring", "ulysses", "star", "apb")
BENCH_COLLECTIVE_TIMEOUT_S = 900.0  # the other hosts wait in a barrier while rank 0 runs `single` alone


def model_dims(preset: str | None, model: str | None, allow_pickle: bool = False) -> ModelDims:
    from apb_core import models

    if preset:
        return ModelDims.from_config(models.build_config(preset))
    return ModelDims.from_config(models.load_config(models.resolve_model(model, allow_pickle=allow_pickle)))


@dataclass
class BenchConfig:
    """One `apb bench` invocation."""

    lengths: list[int]
    hosts: int
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    preset: str | None = "llama-3.1-8b"
    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    repeat: int = 3
    decode_tokens: int = 128
    breakdown: list[str] = field(default_factory=lambda: ["apb"])
    seed: int = 0
    threads: int | None = None
    allow_pickle: bool = False
    decode: str = "auto"  # apb_core.runtime.engine.DECODE_MODES
    layout: str = "balanced"  # apb_core.algorithm.methods.LAYOUTS (full, star, apb)
    auto_exact: bool = False  # time what `apb ask --method apb` would run (exact where about as cheap)
    questions: int = 1  # questions answered over each prefill (`apb ask -q A -q B ...`)
    cite: bool = False  # decode collects the attention mass for citations (`apb ask --cite`)
    workers: int | None = None  # worker processes (None: one per host); fewer: hosts take turns, rows projected
    link_gibps: float = PROJECTED_LINK_GIBPS  # the all-gather bandwidth a projected prefill assumes


@dataclass
class BenchReport:
    """Rows (one per length and method, JSON-ready), the machine, and the logits after the query phase
    (rank 0's; exact methods must agree with single) keyed by (method, length)."""

    config: dict[str, Any]
    machine: dict[str, Any]
    rows: list[dict[str, Any]]
    logits: dict[tuple[str, int], torch.Tensor]
    generated: dict[tuple[str, int], list[int]]

    def payload(self) -> dict[str, Any]:
        return {"machine": self.machine, "config": self.config, "rows": self.rows}


def validate(config: BenchConfig, dims: ModelDims) -> None:
    """InputError naming the first bad option."""
    if config.hosts < 1:
        raise InputError(f"--hosts must be at least 1 (got {config.hosts})")
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown or not config.methods:
        raise InputError(f"--methods: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    if config.repeat < 1:
        raise InputError(f"--repeat must be at least 1 (got {config.repeat})")
    if config.questions < 1:
        raise InputError(f"--questions must be at least 1 (got {config.questions})")
    if config.decode_tokens < 0:
        raise InputError(f"--decode-tokens must not be negative (got {config.decode_tokens})")
    for length in config.lengths:
        if length < 2 * config.hosts or length < 2 * INSERT_AT:
            raise InputError(f"--len {length} is too short for {config.hosts} hosts")
    workers = config.workers or config.hosts
    if workers < 1 or config.hosts % workers:
        raise InputError(f"--workers {workers} must divide --hosts {config.hosts}")
    ring_like = [m for m in config.methods if m in ("ring", "ulysses")]
    if workers < config.hosts and ring_like:
        raise InputError(f"{', '.join(ring_like)} need one process per host: use --workers {config.hosts}")
    if "ulysses" in config.methods and dims.q_heads < config.hosts:
        raise InputError(f"ulysses needs a query head per host: the model has {dims.q_heads}, --hosts {config.hosts}")


def _machine(device: str, hosts: int, workers: int) -> dict[str, Any]:
    from kernels import backend_name

    info: dict[str, Any] = {"device": device, "hosts": hosts, "workers": workers, "torch": torch.__version__,
                            "attention_backend": backend_name(device)}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus_visible"] = torch.cuda.device_count()
    else:
        info["cpu_cores"] = os.cpu_count()
    return info


def random_tokens(length: int, vocab: int, seed: int, questions: int = 1) -> list[int]:
    """The prompt every method gets: context + one query per question, ids away from the special tokens at the
    ends (the first question's tokens do not depend on `questions`)."""
    rng = random.Random(seed * 1_000_003 + length)
    low, high = min(100, vocab // 4), max(vocab - 300, vocab // 2)
    return [rng.randrange(low, high) for _ in range(length + QUERY_LEN * questions)]


def run_bench(config: BenchConfig, on_event: Callable[[Event], None] | None = None) -> BenchReport:
    """Run every method at every length on `config.hosts` workers; one model load per worker."""
    emit = on_event or (lambda e: None)
    dims = model_dims(config.preset, config.model, config.allow_pickle)
    validate(config, dims)
    # NVLink multicast off in every process (NCCL and torch settings, inherited by the workers): the shared
    # multi-GPU hosts require it
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env = read_env()
    if not env.collective_timeout_given:
        env = dataclasses.replace(env, collective_timeout_s=BENCH_COLLECTIVE_TIMEOUT_S)
    workers = config.workers or config.hosts
    threads = config.threads or (max(1, (os.cpu_count() or 1) // workers) if config.device == "cpu" else None)
    spec = WorkerSpec(model=None if config.preset else config.model, preset=config.preset, device=config.device,
                      dtype=config.dtype, threads=threads, allow_pickle=config.allow_pickle, seed=config.seed,
                      decode=config.decode, env=env, timed=workers < config.hosts)
    engine_methods = [m for m in config.methods if m != "hf"]
    jobs = [BenchJob(length, random_tokens(length, dims.vocab, config.seed, config.questions), engine_methods,
                     config.repeat, config.decode_tokens, list(config.breakdown), dims, config.layout,
                     config.auto_exact, config.questions, config.cite)
            for length in config.lengths]
    engine_runs: list[list[list[HostRun]]] = []
    if engine_methods:
        with start_hosts(spec, config.hosts, emit, workers) as runner:
            for job in jobs:
                emit(Event("phase", phase="bench", text=f"{job.length} tokens"))
                engine_runs.append(runner.run(job))
    else:
        engine_runs = [[[] for _ in range(config.hosts)] for _ in jobs]
    hf_runs = bench_hf(config, jobs, emit) if "hf" in config.methods else []
    per_length: list[tuple[BenchJob, list[list[HostRun]]]] = []
    for i, (job, per_host) in enumerate(zip(jobs, engine_runs, strict=True)):
        job.methods = list(config.methods)
        if hf_runs:  # rank 0 ran it; the other hosts sat it out
            at = config.methods.index("hf")
            for rank, runs in enumerate(per_host):
                runs.insert(at, hf_runs[i] if rank == 0 else HostRun("hf", rank, False, [], 0.0, []))
        per_length.append((job, per_host))
    rows, logits, generated = [], {}, {}
    for job, per_host in per_length:
        length_rows = summarise(job, per_host, dims, config.link_gibps)
        rows += length_rows
        for run in per_host[0]:
            logits[(run.method, job.length)] = run.logits
            generated[(run.method, job.length)] = run.generated
    cfg = {"lengths": config.lengths, "hosts": config.hosts, "methods": config.methods,
           "preset": config.preset, "model": config.model, "repeat": config.repeat,
           "decode_tokens": config.decode_tokens, "decode": config.decode, "layout": config.layout,
           "auto_exact": config.auto_exact, "questions": config.questions, "cite": config.cite,
           "workers": workers, "link_gibps": config.link_gibps if workers < config.hosts else None,
           "seed": config.seed, "query_len": QUERY_LEN,
           "dims": dims.__dict__}
    return BenchReport(cfg, _machine(config.device, config.hosts, workers), rows, logits, generated)


def bench_hf(config: BenchConfig, jobs: list[BenchJob], emit: Callable[[Event], None]) -> list[HostRun]:
    """The `hf` reference in this process: plain transformers, the same weights and tokens (see top)."""
    from apb_core import models
    from apb_core.baselines.hf import timed_generate

    device = torch.device("cuda", 0) if config.device == "cuda" else torch.device("cpu")
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(config.threads * config.hosts if config.threads else (os.cpu_count() or 1))
    try:
        if config.preset:
            model = models.build_random_model(config.preset, device, config.dtype, attn_implementation="sdpa",
                                              seed=config.seed)
        else:
            source = models.resolve_model(config.model, allow_pickle=config.allow_pickle)
            model = models.load_model(source, device=device, dtype=config.dtype, attn_implementation="sdpa")
        runs = []
        for job in jobs:
            emit(Event("phase", phase="bench", text=f"hf {job.length} tokens"))
            context = torch.tensor([job.tokens[: job.length]], device=device)
            run = HostRun("hf", 0, True, [], 0.0, [], tokens=job.length, pairs=job.length * (job.length + 1) / 2,
                          block_len=job.length)
            for i in range(1 + job.repeat):
                emit(Event("progress", phase="bench", done=i, total=1 + job.repeat, text=f"hf {job.length}"))
                sync(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model(context, use_cache=True, logits_to_keep=1)
                sync(device)
                seconds = time.perf_counter() - t0
                if i == 0:
                    run.warmup_s = seconds
                else:
                    run.prefill_s.append(seconds)
                    run.host_prefill_s.append(seconds)
            run.logits, run.generated, _, run.token_s = timed_generate(model, job.tokens[: job.length + QUERY_LEN],
                                                                         job.decode_tokens)
            run.generated = run.generated[: job.decode_tokens]
            if device.type == "cuda":
                run.peak_bytes = int(torch.cuda.max_memory_allocated(device))
            runs.append(run)
        return runs
    finally:
        torch.set_num_threads(before)


