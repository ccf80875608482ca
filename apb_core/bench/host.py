"""What one host does for `apb bench`: time each method's prefill, then decode, through the runtime's own code.

Every method is a prefill strategy of the same engine (apb_core.runtime.prefill), so the model code, the KV
cache and the decode loop (apb_core.runtime.generate.decode) are the ones `apb ask` runs; only the layout and
the attention of prefill differ. What is timed (paper section 10, tightened): each prefill is bracketed by
device synchronisation and a barrier of all hosts, so it runs from the moment every host can start to the
moment the last one is done. One warm-up, then `repeat` runs.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from apb_core.algorithm.flops import ModelDims, apb_pairs
from apb_core.algorithm.layout import plan_hosts, split_blocks
from apb_core.algorithm.methods import PassingSpec, resolve_method
from apb_core.api import Event
from apb_core.baselines.ring import ring_pairs, ring_prefill, zigzag_plans
from apb_core.baselines.ulysses import block_plans, ulysses_pairs, ulysses_prefill
from apb_core.dist.local_hosts import Op
from apb_core.runtime.attention_mass import cite_layers
from apb_core.runtime.engine import HostEngine
from apb_core.runtime.generate import decode
from apb_core.runtime.prefill import Strategy, apb_prefill
from apb_core.runtime.prompt import Prompt, shared_prompt
from apb_core.runtime.timing import PhaseTimer, barrier, sync

QUERY_LEN = 32  # tokens after the context: the question (first 24, also put in APB's anchor) + template tail
QUESTION_LEN = 24
INSERT_AT = 16  # where the question enters the anchor (after a Llama-3-like chat header)


@dataclass
class BenchJob:
    """What every host runs for one context length (the same tokens on every host)."""

    length: int
    tokens: list[int]  # context (length) + one query (QUERY_LEN) per question
    methods: list[str]
    repeat: int
    decode_tokens: int
    breakdown: list[str]
    dims: ModelDims
    layout: str = "balanced"
    auto_exact: bool = False  # apb as `apb ask` runs it: exact where that costs about as much (methods.py)
    questions: int = 1  # questions answered in turn over each prefill (apb: all of them in anchor and probe)
    cite: bool = False  # decode collects the attention mass for citations, as `apb ask --cite`

    @property
    def context_len(self) -> int:
        return self.length

    def prompts(self) -> list[Prompt]:
        """One prompt per question: the same context, each its own QUERY_LEN query tokens."""
        ctx, rest = self.tokens[: self.length], self.tokens[self.length :]
        queries = [rest[i * QUERY_LEN : (i + 1) * QUERY_LEN] for i in range(self.questions)]
        return [Prompt(ctx, q, q[:QUESTION_LEN], q[:QUESTION_LEN], min(INSERT_AT, self.length)) for q in queries]

    def prompt(self) -> Prompt:
        """The prefill's prompt (every question in the anchor and the probe: runtime.prompt.shared_prompt)."""
        return shared_prompt(self.prompts())

    def run(self, host, emit: Callable[[Event], None]) -> list[HostRun]:
        """Every method of the job on this host, in order (the worker's entry for a bench job)."""
        return [bench_method(host.engine, method, self, emit) for method in self.methods]


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
    passing_len: int | str = 0  # configured l_p (as in `apb ask`)
    passing_received: int = 0  # tokens this host received per layer
    block_len: int = 0
    query_s: float = 0.0
    token_s: list[float] = field(default_factory=list)
    cite_s: list[float] = field(default_factory=list)  # --cite: each answer's fold and gather of the mass
    peak_bytes: int | None = None
    logits: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)
    breakdown: dict[str, float] | None = None
    auto_exact: bool = False  # apb ran the exact layout (bench --auto-exact)
    question_query_s: list[float] = field(default_factory=list)  # each question's query phase (the first: query_s)
    # hosts taking turns in one process (bench --workers 1): each timed prefill's ledger (bench.projection)
    prefill_ops: list[list[Op]] = field(default_factory=list)


@dataclass
class MethodSetup:
    """A method's layout and strategy on this host."""

    plan: Any  # HostPlan, ZigzagPlan or BlockPlan
    strategy: Strategy
    passing: PassingSpec | None
    block_lens: list[int]
    anchor_len: int = 0
    passing_len: int | str = 0
    auto_exact: bool = False


def setup_method(engine: HostEngine, method: str, prompt: Prompt, dims: ModelDims | None = None,
                 layout: str = "balanced", auto_exact: bool = False) -> MethodSetup:
    """Plan and strategy of `method` for this host (the engine's hosts and rank); `layout` applies to the methods
    of APB's machinery (full, star, apb; ring and Ulysses have their own), balanced only given `dims`."""
    ctx = prompt.context_ids
    n, hosts, rank = len(ctx), engine.hosts, engine.rank
    block_lens = [end - start for start, end in split_blocks(n, hosts)]
    if method == "ring":
        return MethodSetup(zigzag_plans(n, hosts)[rank], ring_prefill, None, block_lens)
    if method == "ulysses":
        return MethodSetup(block_plans(n, hosts)[rank], ulysses_prefill, None, block_lens)
    cfg = resolve_method("full" if method == "single" else method, n, hosts, dims=dims, auto_exact=auto_exact,
                         layout=layout, device=engine.device.type)
    plans = plan_hosts(ctx, hosts, cfg.anchor_len, prompt.question_ids, prompt.insert_at, cfg.question_in_anchor,
                       prompt.probe_ids if cfg.probe else [], n, cfg.block_lens,
                       prompt.probe_lens if cfg.probe else ())
    return MethodSetup(plans[rank], apb_prefill, cfg.passing, list(cfg.block_lens), cfg.anchor_len,
                       cfg.passing_len, cfg.auto_exact)


def _pairs(method: str, setup: MethodSetup, received: int, dims: ModelDims) -> float:
    plan = setup.plan
    if method == "ring":
        return float(ring_pairs(plan))
    if method == "ulysses":
        return ulysses_pairs(plan, dims.q_heads, dims.kv_heads)
    return float(apb_pairs(plan.anchor_len, received, plan.block_len + plan.probe_len))


def _prefill(engine: HostEngine, setup: MethodSetup, prompt: Prompt, reserve: int,
             timer: PhaseTimer | None = None):
    kwargs = {"timer": timer} if timer is not None else {}
    return engine.prefill(setup.plan, prompt.context_ids, setup.strategy, setup.passing, setup.block_lens, reserve,
                          **kwargs)


def _release(*engines: HostEngine | None) -> None:
    for engine in engines:
        if engine is not None:
            engine.release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_method(engine: HostEngine, method: str, job: BenchJob, emit: Callable[[Event], None] | None = None,
                 ) -> HostRun:
    """Time `method` on this host (every host calls this with the same arguments)."""
    prompt = job.prompt()
    rank, hosts = engine.rank, engine.hosts
    if method == "single" and hosts > 1:  # one GPU: rank 0 alone, with an engine of one host
        target = HostEngine(engine.model, 0, 1, decode=engine.decode_mode) if rank == 0 else None
    else:
        target = engine
    _release(engine)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    setup = setup_method(target, method, prompt, job.dims, job.layout, job.auto_exact) if target is not None else None
    reserve = len(prompt.query_ids) + job.decode_tokens + 2
    run = HostRun(method, rank, target is not None, [], 0.0, [])
    call = None
    turns = getattr(engine.comm, "shared", None)  # LocalHosts: the hosts take turns in this process
    ledger = turns if turns is not None and turns.count == hosts and turns.timed else None  # all of them: W = 1
    for i in range(1 + job.repeat):
        if emit is not None and rank == 0:
            emit(Event("progress", phase="bench", done=i, total=1 + job.repeat, text=f"{method} {job.length}"))
        barrier(engine.device, hosts, engine.comm)
        mark = len(ledger.ops) if ledger is not None else 0
        t0 = time.perf_counter()
        if target is not None:
            call = _prefill(target, setup, prompt, reserve)
            sync(target.device)
        host_s = time.perf_counter() - t0
        barrier(engine.device, hosts, engine.comm)
        total = time.perf_counter() - t0
        if i == 0:
            run.warmup_s = total
        else:
            run.prefill_s.append(total)
            run.host_prefill_s.append(host_s)
            if ledger is not None and rank == 0:
                run.prefill_ops.append(ledger.ops[mark:])
    if target is not None:
        plan = setup.plan
        run.tokens = int(plan.position_ids().shape[1])
        run.pairs = _pairs(method, setup, call.passing_received, job.dims)
        run.anchor_len, run.passing_len, run.auto_exact = setup.anchor_len, setup.passing_len, setup.auto_exact
        run.passing_received, run.block_len = call.passing_received, plan.block_len
        if job.cite:
            target.collect_mass(cite_layers(target.layers), job.decode_tokens + 1)
        for i, question in enumerate(job.prompts()):  # every question over the one prefill, the first reported
            target.rewind()
            if target.mass is not None:
                target.mass.reset()
            barrier(target.device, target.hosts, target.comm)  # as ask does (generate.answer_question)
            decoded = decode(target, question.query_ids, len(prompt.context_ids), job.decode_tokens + 1,
                             lambda logits: int(logits.argmax()))
            if job.cite:  # as ask does after each answer: fold the recorded rows, gather the hosts' masses
                t_cite = time.perf_counter()
                target.gather_mass()
                sync(target.device)
                run.cite_s.append(time.perf_counter() - t_cite)
            run.question_query_s.append(decoded.query_s)
            run.token_s += decoded.token_s
            if i == 0:
                run.logits, run.query_s = decoded.first_logits, decoded.query_s
                run.generated = decoded.tokens[: job.decode_tokens]
    barrier(engine.device, hosts, engine.comm)
    if method in job.breakdown and target is not None:
        run.breakdown = _breakdown(target, setup, prompt, reserve)
    barrier(engine.device, hosts, engine.comm)
    if engine.device.type == "cuda":
        run.peak_bytes = int(torch.cuda.max_memory_allocated(engine.device))
    _release(engine, target)
    return run


def _breakdown(engine: HostEngine, setup: MethodSetup, prompt: Prompt, reserve: int) -> dict[str, float]:
    """Seconds per phase of one prefill with synchronising timers (hosts of the method only): q/k/v projections,
    the attention (APB: compress, a barrier that absorbs the hosts' imbalance, all-gather, attention), o-proj and
    FFN; "other" is the rest (embedding, norms, RoPE, cache writes)."""
    timer = PhaseTimer(engine.device)
    handles = timer.hook(engine.model)
    try:
        barrier(engine.device, engine.hosts, engine.comm)
        t0 = time.perf_counter()
        _prefill(engine, setup, prompt, reserve, timer)
        sync(engine.device)
        total = time.perf_counter() - t0
    finally:
        for handle in handles:
            handle.remove()
    phases = dict(timer.totals)
    phases["other"] = max(total - sum(phases.values()), 0.0)
    phases["total"] = total
    return phases
