"""`apb bench`: prefill speed of full, ring, Ulysses, Star and APB on the same random prompt, same hosts.

Every method is a prefill strategy of the same engine (`HostEngine.prefill_op` + a per-host plan), so the
model code, the KV cache and the decode path are shared and only the attention of prefill differs:

| method    | hosts | layout                                   | attention in prefill                              |
|-----------|-------|------------------------------------------|---------------------------------------------------|
| hf        | 1     | plain transformers in the calling process | its own sdpa (`model(...)`, `generate`), no apb  |
| full      | 1     | the whole context on rank 0              | causal (the others wait: "one GPU")               |
| ring      | H     | zigzag chunks r and 2H-1-r (ring.py)     | exact, K/V passed around a ring with P2P          |
| ulysses   | H     | contiguous blocks (ulysses.py)           | exact, all-to-all to heads and back               |
| allgather | H     | contiguous blocks                        | exact, APB machinery with every earlier KV passed |
| star      | H     | blocks, anchor = the whole first block   | approximate (Star Attention phase 1)              |
| apb       | H     | blocks, anchor l_a with the query, l_p   | approximate (APB)                                 |

What is timed (paper section 10, tightened): each prefill is bracketed by device synchronisation and a
barrier of all hosts, so it runs from the moment every host can start to the moment the last one is done.
One warm-up, then the median of `repeat` runs. After the last run the query (32 tokens) and `decode_tokens`
greedy tokens are decoded at that context; each token's time covers the last host's argmax, its broadcast
and one forward on every host. Random token ids (seeded) are fed to every method, so the exact methods'
logits can be compared with `full` (tests/test_bench.py does).

`hf` is the reference a user has without apb: the same weights loaded by plain transformers in the calling
process after the workers have exited (all cores or `--threads` x hosts), prefill timed as one
`model(context, logits_to_keep=1)` call, decode as `generate` (time to first token, then per token).

FLOPs: `effective` counts what exact causal attention over the context costs (peers.md §4.3 generalised
to any shape: linear layers 2·params per token, attention 4·Hq·d per query-key pair over N(N+1)/2 pairs,
LM head excluded), so a method that skips work shows more than the hardware does; `executed` counts the
pairs each method's mask allows and the tokens each host really projects (anchor, probe, zigzag chunks).

Breakdown mode (off in the timed runs): one more prefill with synchronising timers around q/k/v
projections, the attention op (APB: compress, a barrier that absorbs the hosts' imbalance, all-gather,
attention), o-proj and FFN; "other" is the rest (embedding, norms, RoPE, cache writes).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import pickle
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from apb_core.api import Event
from apb_core.attention import apb_attention
from apb_core.engine import HostEngine, apb_prefill_op
from apb_core.errors import InputError
from apb_core.flops import ModelDims
from apb_core.launcher import Workers
from apb_core.layout import plan_hosts, split_blocks
from apb_core.methods import resolve_method
from apb_core.passing import exchange_passing
from apb_core.prompt import Prompt
from apb_core.ring import ring_pairs, ring_prefill_op, zigzag_plans
from apb_core.ulysses import block_plans, ulysses_pairs, ulysses_prefill_op
from apb_core.worker import WorkerSpec, _describe, _follow_parent, device_for, init_group, is_oom, load_host
from kernels.apb_mask import apb_pairs

METHODS = ("hf", "full", "ring", "ulysses", "allgather", "star", "apb")
DEFAULT_METHODS = ("full", "ring", "ulysses", "star", "apb")
EXACT_METHODS = ("hf", "full", "ring", "ulysses", "allgather")
QUERY_LEN = 32  # tokens after the context: the question (first 24, also put in APB's anchor) + template tail
QUESTION_LEN = 24
INSERT_AT = 16  # where the question enters the anchor (after a Llama-3-like chat header)


# ---- configuration and model shape ---------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    """'2k,32k,128k' or '131072' -> token counts (k = 1024, m = 1024²). Raises InputError on bad input."""
    out = []
    for part in text.split(","):
        item = part.strip().lower()
        scale = {"k": 1024, "m": 1024 * 1024}.get(item[-1:], 1)
        digits = item[:-1] if scale > 1 else item
        try:
            value = float(digits) * scale
        except ValueError:
            raise InputError(f"--len: cannot read {part.strip()!r} (use e.g. 2k, 32k, 128k or 131072)") from None
        if not value.is_integer() or value < 1:
            raise InputError(f"--len: {part.strip()!r} is not a whole number of tokens")
        out.append(int(value))
    return out


def model_dims(preset: str | None, model: str | None, allow_pickle: bool = False) -> ModelDims:
    from apb_core import model as models

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
    decode_tokens: int = 8
    breakdown: list[str] = field(default_factory=lambda: ["apb"])
    seed: int = 0
    threads: int | None = None
    allow_pickle: bool = False


@dataclass
class BenchJob:
    """What every host runs for one context length (the same tokens on every host)."""

    length: int
    tokens: list[int]  # context (length) + query (QUERY_LEN)
    methods: list[str]
    repeat: int
    decode_tokens: int
    breakdown: list[str]

    def prompt(self) -> Prompt:
        ctx, query = self.tokens[: self.length], self.tokens[self.length :]
        return Prompt(ctx, query, query[:QUESTION_LEN], query[:QUESTION_LEN], min(INSERT_AT, self.length))


@dataclass
class HostRun:
    """One method on one host at one length."""

    method: str
    rank: int
    participated: bool
    prefill_s: list[float]  # barrier-bracketed, after the warm-up
    warmup_s: float
    host_prefill_s: list[float]  # this host's own compute (synchronised), after the warm-up
    tokens: int = 0  # tokens this host runs through the model in prefill
    pairs: float = 0.0  # query-key pairs per layer, in all-head units
    anchor_len: int = 0
    passing_len: int = 0
    block_len: int = 0
    query_s: float = 0.0
    token_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    logits: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)
    breakdown: dict[str, float] | None = None


# ---- timing helpers ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(engine: HostEngine) -> None:
    _sync(engine.device)
    if engine.hosts > 1:
        dist.barrier(group=engine.group)
        _sync(engine.device)


class PhaseTimer:
    """Exclusive wall time per named region, device-synchronised at every edge (breakdown mode only)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [start, time spent in nested regions]

    def start(self) -> None:
        _sync(self.device)
        self._stack.append([time.perf_counter(), 0.0])

    def stop(self, name: str) -> None:
        _sync(self.device)
        start, nested = self._stack.pop()
        spent = time.perf_counter() - start
        self.totals[name] += spent - nested
        if self._stack:
            self._stack[-1][1] += spent

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop(name)

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


def _timed_op(op: Callable, timer: PhaseTimer) -> Callable:
    """The method's prefill op with its attention timed; APB's op is split into its phases."""
    if op is not apb_prefill_op:
        def timed(engine, layer, q, k, v, scale):
            with timer.region("attention"):
                return op(engine, layer, q, k, v, scale)
        return timed

    def timed_apb(engine, layer, q, k, v, scale):  # apb_prefill_op, phase by phase
        k_pass = v_pass = None
        if engine.hosts > 1 and engine.passing.active:
            with timer.region("compress"):
                k_sel, v_sel = engine._compress(layer, q, k, v, scale)
            with timer.region("wait"):  # imbalance between hosts, kept out of the all-gather's time
                dist.barrier(group=engine.group)
            with timer.region("all-gather"):
                k_pass, v_pass = exchange_passing(k_sel, v_sel, engine.counts, engine.rank, engine.group)
        with timer.region("attention"):
            return apb_attention(q, k, v, engine.plan.anchor_len, k_pass, v_pass, scale)
    return timed_apb


# ---- one method on one host -------------------------------------------------------------------------------


@dataclass
class MethodSetup:
    plan: Any  # HostPlan, ZigzagPlan or BlockPlan
    passing: Any  # PassingSpec
    block_lens: list[int]
    op: Callable


def setup_method(engine: HostEngine, method: str, prompt: Prompt) -> MethodSetup:
    """Plan, passing and prefill op of `method` for this host (the engine's hosts and rank)."""
    from apb_core.engine import PassingSpec

    ctx = prompt.context_ids
    n, hosts, rank = len(ctx), engine.hosts, engine.rank
    block_lens = [end - start for start, end in split_blocks(n, hosts)]
    if method == "ring":
        return MethodSetup(zigzag_plans(n, hosts)[rank], PassingSpec(0), block_lens, ring_prefill_op)
    if method == "ulysses":
        return MethodSetup(block_plans(n, hosts)[rank], PassingSpec(0), block_lens, ulysses_prefill_op)
    cfg = resolve_method("full" if method in ("full", "allgather") else method, n, hosts)
    plans = plan_hosts(ctx, hosts, cfg.anchor_len, prompt.question_ids, prompt.insert_at, cfg.question_in_anchor,
                       prompt.probe_ids if cfg.probe else [], n)
    return MethodSetup(plans[rank], cfg.passing, block_lens, apb_prefill_op)


def _pairs(engine: HostEngine, method: str, setup: MethodSetup, dims: ModelDims) -> float:
    plan = setup.plan
    if method == "ring":
        return float(ring_pairs(plan))
    if method == "ulysses":
        return ulysses_pairs(plan, dims.q_heads, dims.kv_heads)
    return float(apb_pairs(plan.anchor_len, engine.passing_received, plan.block_len + plan.probe_len))


def prefill(engine: HostEngine, setup: MethodSetup, prompt: Prompt, reserve: int) -> None:
    """One prefill of `prompt`'s context with `setup`'s strategy; the cache then holds this host's KV."""
    engine.prefill_op = setup.op
    try:
        engine.prefill(setup.plan, prompt.context_ids, setup.passing, setup.block_lens, reserve=reserve)
    finally:
        engine.prefill_op = apb_prefill_op


def decode(engine: HostEngine, prompt: Prompt, new_tokens: int) -> tuple[torch.Tensor, list[int], float, list[float]]:
    """Query phase then greedy tokens after a prefill: (logits after the query, tokens, query s, s per token)."""
    n = len(prompt.context_ids)
    _sync(engine.device)
    t0 = time.perf_counter()
    logits = engine.step(prompt.query_ids, n)
    _sync(engine.device)
    query_s = time.perf_counter() - t0
    first = logits.detach().float().cpu()
    pos = n + len(prompt.query_ids)
    tokens, token_s = [], []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        token = int(logits.argmax()) if engine.is_last else 0
        if engine.hosts > 1:
            t = torch.tensor([token], dtype=torch.long, device=engine.device)
            dist.broadcast(t, src=engine.hosts - 1, group=engine.group)
            token = int(t.item())
        tokens.append(token)
        logits = engine.step([token], pos)
        _sync(engine.device)
        token_s.append(time.perf_counter() - t0)
        pos += 1
    return first, tokens, query_s, token_s


def _release(*engines: HostEngine | None) -> None:
    for engine in engines:
        if engine is not None:
            engine.cache = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_method(engine: HostEngine, method: str, job: BenchJob, dims: ModelDims,
                 emit: Callable[[Event], None] | None = None) -> HostRun:
    """Time `method` on this host (every host calls this with the same arguments)."""
    prompt = job.prompt()
    rank, hosts = engine.rank, engine.hosts
    solo = method == "full" and hosts > 1  # one GPU: rank 0 alone, with an engine of one host
    if solo:
        target = HostEngine(engine.model, 0, 1) if rank == 0 else None
    else:
        target = engine
    _release(engine)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    setup = setup_method(target, method, prompt) if target is not None else None
    reserve = len(prompt.query_ids) + job.decode_tokens + 1
    run = HostRun(method, rank, target is not None, [], 0.0, [])
    for i in range(1 + job.repeat):
        if emit is not None and rank == 0:
            emit(Event("progress", phase="bench", done=i, total=1 + job.repeat, text=f"{method} {job.length}"))
        _barrier(engine)
        t0 = time.perf_counter()
        if target is not None:
            prefill(target, setup, prompt, reserve)
            _sync(target.device)
        host_s = time.perf_counter() - t0
        _barrier(engine)
        total = time.perf_counter() - t0
        if i == 0:
            run.warmup_s = total
        else:
            run.prefill_s.append(total)
            run.host_prefill_s.append(host_s)
    if target is not None:
        plan = setup.plan
        run.tokens = plan.anchor_len + plan.block_len + plan.probe_len
        run.pairs = _pairs(target, method, setup, dims)
        run.anchor_len, run.passing_len, run.block_len = plan.anchor_len, target.passing_received, plan.block_len
        run.logits, run.generated, run.query_s, run.token_s = decode(target, prompt, job.decode_tokens)
    _barrier(engine)
    if method in job.breakdown and target is not None:
        run.breakdown = _breakdown(target, setup, prompt, reserve)
    _barrier(engine)
    if engine.device.type == "cuda":
        run.peak_bytes = int(torch.cuda.max_memory_allocated(engine.device))
    _release(engine, target)
    return run


def _breakdown(engine: HostEngine, setup: MethodSetup, prompt: Prompt, reserve: int) -> dict[str, float]:
    """Seconds per phase of one prefill with synchronising timers (hosts of the method only)."""
    timer = PhaseTimer(engine.device)
    handles = timer.hook(engine.model)
    engine.phase_timer = timer
    timed = MethodSetup(setup.plan, setup.passing, setup.block_lens, _timed_op(setup.op, timer))
    try:
        _barrier(engine)
        t0 = time.perf_counter()
        prefill(engine, timed, prompt, reserve)
        _sync(engine.device)
        total = time.perf_counter() - t0
    finally:
        for handle in handles:
            handle.remove()
        engine.phase_timer = None
    phases = dict(timer.totals)
    phases["other"] = max(total - sum(phases.values()), 0.0)
    phases["total"] = total
    return phases


def bench_host(engine: HostEngine, job: BenchJob, dims: ModelDims,
               emit: Callable[[Event], None] | None = None) -> list[HostRun]:
    """Every method of `job` on this host, in order."""
    return [bench_method(engine, method, job, dims, emit) for method in job.methods]


# ---- workers ----------------------------------------------------------------------------------------------


def bench_worker_main(rank: int, hosts: int, spec: WorkerSpec, init_method: str, jobs, events) -> None:
    """Process entry of a bench worker; speaks the launcher's protocol (ready / event / result / error).

    A job is (BenchJob, ModelDims); the result is the pickled list of HostRun."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _follow_parent()  # the launcher's Ctrl-C handling and its death end this worker too
    length = None
    try:
        device = device_for(spec, rank)
        init_group(rank, hosts, device, init_method)
        engine, _, load_s = load_host(spec, rank, hosts, device)
        events.put(("ready", rank, load_s))
        while True:
            item = jobs.get()
            if item is None:
                break
            job, dims = item
            length = job.length
            runs = bench_host(engine, job, dims, emit=lambda e: events.put(("event", e)))
            events.put(("result", rank, pickle.dumps(runs)))
    except KeyboardInterrupt:
        return
    except BaseException as exc:  # one line to the parent, which ends the other workers
        text = _describe(exc)
        if is_oom(exc):
            text = f"out of memory on host {rank} of {hosts} at --len {length}: {text}"
        try:
            events.put(("error", rank, text))
        finally:
            os._exit(1)
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class BenchWorkers(Workers):
    """The launcher's Workers (same failure handling: one failing or dying worker ends the run with one
    WorkerError), running `bench_worker_main` instead of the answer loop."""

    entry = staticmethod(bench_worker_main)
    name = "apb-bench"


class InlineBench:
    """One host in this process (no spawn): `--hosts 1`."""

    def __init__(self, spec: WorkerSpec, on_event: Callable[[Event], None]) -> None:
        self.on_event = on_event
        device = device_for(spec, 0)
        self.engine, _, load_s = load_host(spec, 0, 1, device)
        self.load_s = [load_s]

    def __enter__(self) -> InlineBench:
        return self

    def __exit__(self, *exc) -> None:
        _release(self.engine)

    def run(self, item: tuple[BenchJob, ModelDims]) -> list[list[HostRun]]:
        job, dims = item
        return [bench_host(self.engine, job, dims, self.on_event)]


# ---- the library call -------------------------------------------------------------------------------------


@dataclass
class BenchReport:
    """Rows (one per length and method, JSON-ready), the machine, and the logits after the query phase
    (rank 0's; exact methods must agree with full) keyed by (method, length)."""

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
    if config.decode_tokens < 0:
        raise InputError(f"--decode-tokens must not be negative (got {config.decode_tokens})")
    for length in config.lengths:
        if length < 2 * config.hosts or length < 2 * INSERT_AT:
            raise InputError(f"--len {length} is too short for {config.hosts} hosts")
    if "ulysses" in config.methods and dims.q_heads < config.hosts:
        raise InputError(f"ulysses needs a query head per host: the model has {dims.q_heads}, --hosts {config.hosts}")


def _machine(device: str, hosts: int) -> dict[str, Any]:
    from kernels import backend_name

    info: dict[str, Any] = {"device": device, "hosts": hosts, "torch": torch.__version__,
                            "attention_backend": backend_name(device)}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus_visible"] = torch.cuda.device_count()
    else:
        info["cpu_cores"] = os.cpu_count()
    return info


def random_tokens(length: int, vocab: int, seed: int) -> list[int]:
    """The prompt every method gets: context + query, ids away from the special tokens at the ends."""
    rng = random.Random(seed * 1_000_003 + length)
    low, high = min(100, vocab // 4), max(vocab - 300, vocab // 2)
    return [rng.randrange(low, high) for _ in range(length + QUERY_LEN)]


def run_bench(config: BenchConfig, on_event: Callable[[Event], None] | None = None) -> BenchReport:
    """Run every method at every length on `config.hosts` workers; one model load per worker."""
    emit = on_event or (lambda e: None)
    dims = model_dims(config.preset, config.model, config.allow_pickle)
    validate(config, dims)
    # multicast off on every process (the shared multi-GPU hosts require it), long collective timeouts because
    # the other hosts wait in a barrier while rank 0 runs `full` alone
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("APB_COLLECTIVE_TIMEOUT", "900")
    threads = config.threads or (max(1, (os.cpu_count() or 1) // config.hosts) if config.device == "cpu" else None)
    spec = WorkerSpec(model=None if config.preset else config.model, preset=config.preset, device=config.device,
                      dtype=config.dtype, threads=threads, allow_pickle=config.allow_pickle, seed=config.seed)
    engine_methods = [m for m in config.methods if m != "hf"]
    jobs = [BenchJob(length, random_tokens(length, dims.vocab, config.seed), engine_methods,
                     config.repeat, config.decode_tokens, list(config.breakdown)) for length in config.lengths]
    engine_runs: list[list[list[HostRun]]] = []
    if engine_methods:
        runner = InlineBench(spec, emit) if config.hosts == 1 else BenchWorkers(spec, config.hosts, emit)
        with runner:
            for job in jobs:
                emit(Event("phase", phase="bench", text=f"{job.length} tokens"))
                engine_runs.append(runner.run((job, dims)))
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
        length_rows = summarise(job, per_host, dims, config.hosts)
        rows += length_rows
        for run in per_host[0]:
            logits[(run.method, job.length)] = run.logits
            generated[(run.method, job.length)] = run.generated
    cfg = {"lengths": config.lengths, "hosts": config.hosts, "methods": config.methods,
           "preset": config.preset, "model": config.model, "repeat": config.repeat,
           "decode_tokens": config.decode_tokens, "seed": config.seed, "query_len": QUERY_LEN,
           "dims": dims.__dict__}
    return BenchReport(cfg, _machine(config.device, config.hosts), rows, logits, generated)


def bench_hf(config: BenchConfig, jobs: list[BenchJob], emit: Callable[[Event], None]) -> list[HostRun]:
    """The `hf` reference in this process: plain transformers, the same weights and tokens (see top)."""
    from apb_core import model as models
    from apb_core.hf_reference import timed_generate

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
                _sync(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model(context, use_cache=True, logits_to_keep=1)
                _sync(device)
                seconds = time.perf_counter() - t0
                if i == 0:
                    run.warmup_s = seconds
                else:
                    run.prefill_s.append(seconds)
                    run.host_prefill_s.append(seconds)
            run.logits, run.generated, _, run.token_s = timed_generate(model, job.tokens, job.decode_tokens)
            run.generated = run.generated[: job.decode_tokens]
            if device.type == "cuda":
                run.peak_bytes = int(torch.cuda.max_memory_allocated(device))
            runs.append(run)
        return runs
    finally:
        torch.set_num_threads(before)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _compare_with_full(rows: list[dict[str, Any]], lead_runs: list[HostRun], methods: list[str]) -> None:
    """How far each method's logits after the query phase are from `full`'s (rank 0 holds every method's)."""
    if "full" not in methods:
        return
    full = lead_runs[methods.index("full")]
    if full.logits is None:
        return
    ref = full.logits.float()
    for row, run in zip(rows, lead_runs, strict=True):
        if run.logits is None:
            continue
        diff = run.logits.float() - ref
        row["logits_max_abs_diff_vs_full"] = diff.abs().max().item()
        row["logits_rel_diff_vs_full"] = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
        row["same_tokens_as_full"] = run.generated == full.generated


def summarise(job: BenchJob, per_host: list[list[HostRun]], dims: ModelDims, hosts: int) -> list[dict[str, Any]]:
    """One JSON-ready row per method from every host's runs at one length."""
    rows = []
    exact = dims.exact_flops(job.length)
    for m, method in enumerate(job.methods):
        runs = [host_runs[m] for host_runs in per_host]
        active = [r for r in runs if r.participated]
        lead = runs[0]
        seconds = _median(lead.prefill_s)
        executed = [dims.linear_flops_per_token * r.tokens + dims.attention_flops_per_pair * r.pairs for r in active]
        gpus = len(active)
        critical = active[-1]  # the last host: it holds the query and, for APB/Star, the most work
        row: dict[str, Any] = {
            "method": method,
            "len": job.length,
            "hosts": gpus,
            "exact": method in EXACT_METHODS,
            "prefill_s": seconds,
            "prefill_runs_s": lead.prefill_s,
            "warmup_s": lead.warmup_s,
            "host_prefill_s": [_median(r.host_prefill_s) for r in active],
            "tokens_per_s": job.length / seconds if seconds else None,
            "exact_pflop": exact / 1e15,
            "executed_pflop": sum(executed) / 1e15,
            "busiest_host_pflop": max(executed) / 1e15,
            "effective_tflops": exact / seconds / 1e12 if seconds else None,
            "executed_tflops": sum(executed) / seconds / 1e12 if seconds else None,
            "executed_tflops_per_gpu": sum(executed) / seconds / 1e12 / gpus if seconds else None,
            "busiest_host_tflops": max(executed) / seconds / 1e12 if seconds else None,
            "peak_mem_gib": [None if r.peak_bytes is None else r.peak_bytes / 2**30 for r in active],
            "query_ms": lead.query_s * 1e3 if lead.participated and method != "hf" else None,
            "decode_ms_per_token": (_median(lead.token_s) or math.nan) * 1e3 if lead.token_s else None,
            "anchor_len": critical.anchor_len,
            "passing_len": critical.passing_len,
            "block_len": [r.block_len for r in active],
        }
        with_breakdown = [r for r in active if r.breakdown]
        if with_breakdown:
            row["breakdown_ms"] = {str(r.rank): {k: v * 1e3 for k, v in r.breakdown.items()} for r in with_breakdown}
            last = with_breakdown[-1].breakdown
            row["breakdown_rank"] = with_breakdown[-1].rank
            if "all-gather" in last:
                row["all_gather_share"] = last["all-gather"] / last["total"]
        rows.append(row)
    _compare_with_full(rows, [host_runs for host_runs in per_host[0]], job.methods)
    by_method = {row["method"]: row["prefill_s"] for row in rows}
    for row in rows:
        mine = row["prefill_s"]
        row["speedup_vs"] = {m: (t / mine if t and mine else None) for m, t in by_method.items() if m != row["method"]}
        row["speedup_vs_full"] = row["speedup_vs"].get("full")
    return rows

