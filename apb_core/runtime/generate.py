"""The only prefill → query phase → decode loop. `apb ask` runs it through `AskJob`; `apb bench` drives the same
`decode` with its own timers; the server will too.

Every host runs the same code. The last host samples each token and broadcasts it; every host decodes the
text itself (same tokenizer, same ids), so all agree on stop strings without another message.

Cancellation (the server's client went away) rides on the same broadcast: the hosts run collectives together,
so they must stop at the same step, and one host decides. The last host reads the job's cancel flag (a
`CancelFlag` the launcher shares with every worker) before each token and broadcasts CANCELLED instead of a
sampled token; every host then ends the decode with finish_reason "cancelled". A prefill is not interrupted
(it is seconds at most): the flag is read at the first token after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from apb_core.algorithm.layout import HostPlan, plan_hosts
from apb_core.algorithm.methods import MethodConfig
from apb_core.api import Event
from apb_core.dist.faults import NO_FAULTS, Faults
from apb_core.runtime.attention_mass import cite_layers
from apb_core.runtime.engine import HostEngine
from apb_core.runtime.prompt import Prompt
from apb_core.runtime.sampling import StopText, sample_next
from apb_core.runtime.timing import barrier, sync

CANCELLED = -1  # what the last host broadcasts instead of a token when the job is cancelled (no real token id)


class CancelFlag(Protocol):
    """The launcher's cancel flag as a host sees it: a multiprocessing.Event shared by the worker processes, or a
    threading.Event for the host in the launcher's process (apb_core.dist.launcher)."""

    def is_set(self) -> bool: ...


@dataclass
class Decoded:
    """What one decode produced. token_s[i]: seconds from token i's decision to token i+1's (one forward on every
    host, the last host's sampling and the broadcast); first_logits: after the query phase [V] (on CPU)."""

    tokens: list[int]
    first_logits: torch.Tensor
    query_s: float
    token_s: list[float]
    finish_reason: str  # "stop" (an end-of-sequence token), "stop_string", "length", "cancelled"


def decode(engine: HostEngine, query_ids: list[int], start_pos: int, max_new_tokens: int,
           choose: Callable[[torch.Tensor], int], on_token: Callable[[list[int]], bool] | None = None,
           eos_ids: tuple[int, ...] | list[int] = (), faults: Faults = NO_FAULTS,
           cancel: CancelFlag | None = None) -> Decoded:
    """Run the query part at `start_pos`, then generate up to `max_new_tokens` tokens over the distributed cache.

    choose(logits [V]) -> token runs on the last host only. on_token(tokens so far) -> False stops (stop strings).
    cancel: read by the last host before each token; once set, every host stops there ("cancelled").
    """
    sync(engine.device)
    t0 = time.perf_counter()
    logits = engine.step(query_ids, start_pos)
    first_logits = logits.detach().float().cpu()  # .cpu() waits for the device
    query_s = time.perf_counter() - t0
    pos = start_pos + len(query_ids)
    tokens: list[int] = []
    token_s: list[float] = []
    finish, last = "length", None
    while len(tokens) < max_new_tokens:
        token = engine.broadcast_token(_decide(engine, logits, choose, cancel))  # .item() inside: the one host sync
        if token == CANCELLED:
            finish = "cancelled"
            break
        now = time.perf_counter()
        if last is not None:
            token_s.append(now - last)
        last = now
        if not tokens:
            faults.point("decode", engine.rank)  # after the first generated token
        if token in eos_ids:
            finish = "stop"
            break
        tokens.append(token)
        if on_token is not None and not on_token(tokens):
            finish = "stop_string"
            break
        if len(tokens) >= max_new_tokens:
            break
        logits = engine.step_token(token, pos)
        pos += 1
    return Decoded(tokens, first_logits, query_s, token_s, finish)


def _decide(engine: HostEngine, logits: torch.Tensor, choose: Callable[[torch.Tensor], int],
            cancel: CancelFlag | None) -> int:
    """The token this host offers to the broadcast: the last host's sample, or CANCELLED when the flag is set
    (only the last host reads it, so every host learns the decision from the same broadcast); 0 elsewhere."""
    if not engine.is_last:
        return 0
    if cancel is not None and cancel.is_set():
        return CANCELLED
    return choose(logits)


def host_plan(engine: HostEngine, method: MethodConfig, prompt: Prompt) -> HostPlan:
    """This host's share of `prompt` under `method`'s layout."""
    ctx = prompt.context_ids
    plans = plan_hosts(ctx, engine.hosts, method.anchor_len, prompt.question_ids, prompt.insert_at,
                       method.question_in_anchor, prompt.probe_ids if method.probe else [], len(ctx),
                       method.block_lens or None, prompt.probe_lens if method.probe else ())
    return plans[engine.rank]


@dataclass
class AskJob:
    """Questions about one document, as every host runs it (`run` is the worker's entry for it): one prefill of
    `prompt`'s context, then each question's query phase and decode over that cache, which goes back to the
    document-only state between questions (HostEngine.rewind).

    prompt: the prefill (context, the anchor's question(s), the probe: apb_core.runtime.prompt.shared_prompt for
    several questions). query_parts: each question's query part, in order (empty: prompt.query_ids alone); the
    questions are numbered index, index + 1, ... in events and share the sampling settings.
    """

    prompt: Prompt
    method: MethodConfig
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    eos_ids: list[int] = field(default_factory=list)
    index: int = 0
    stream: bool = True
    query_parts: list[list[int]] = field(default_factory=list)
    cite: bool = False  # collect the decode's attention over the context (JobResult.context_mass on rank 0)

    @property
    def context_len(self) -> int:
        return self.prompt.context_len

    @property
    def queries(self) -> list[list[int]]:
        return self.query_parts or [self.prompt.query_ids]

    def run(self, host, emit: Callable[[Event], None]) -> list[JobResult]:
        return run_questions(host.engine, self, host.tokenizer, emit, host.faults, cancel=host.cancel)


@dataclass
class JobResult:
    """One question's answer on one host. With several questions over one prefill, every result carries the
    same prefill numbers; decode_s and query_s are the question's own."""

    answer: str
    token_ids: list[int]
    prefill_s: float  # from the common start to the last host's end of prefill
    decode_s: float  # query phase + generation (+ folding the citation mass with --cite)
    host_prefill_s: float  # this host's own prefill time
    block_tokens: int
    anchor_tokens: int
    passing_tokens: int  # tokens this host received per layer (per KV head)
    finish_reason: str = "length"  # Decoded.finish_reason
    first_logits: torch.Tensor | None = None  # logits after the query phase (tests compare them)
    query_s: float = 0.0  # the query phase alone (part of decode_s)
    # --cite, rank 0: the answer's attention mass per context token [context_len] (runtime.attention_mass)
    context_mass: torch.Tensor | None = None


def run_job(engine: HostEngine, job: AskJob, tokenizer, emit: Callable[[Event], None] | None = None,
            faults: Faults = NO_FAULTS) -> JobResult:
    """The first (for a one-question job: the only) answer of `job` on this host (run_questions)."""
    return run_questions(engine, job, tokenizer, emit, faults)[0]


def run_questions(engine: HostEngine, job: AskJob, tokenizer, emit: Callable[[Event], None] | None = None,
                  faults: Faults = NO_FAULTS, headroom: int = 0, cancel: CancelFlag | None = None) -> list[JobResult]:
    """Prefill `job`'s context once, then answer each of its questions in turn on this host; one JobResult per
    question. `emit` receives progress and (on rank 0) streamed token events. `headroom`: extra cache room on the
    last host for questions asked later over the same prefill (the server's document cache). `cancel`: see
    `decode` (a question after a cancelled one is cancelled at its first token: every host still returns one
    result per question)."""
    emit = emit or (lambda event: None)
    prompt, method, rank = job.prompt, job.method, engine.rank
    ctx = prompt.context_ids
    plan = host_plan(engine, method, prompt)
    queries = job.queries

    def on_layer(layer: int) -> None:
        emit(Event("progress", rank=rank, phase="prefill", done=layer + 1, total=engine.layers, question=job.index))

    barrier(engine.device, engine.hosts, engine.comm)
    faults.point("prefill", rank)
    t0 = time.perf_counter()
    call = engine.prefill(plan, ctx, passing=method.passing, block_lens=list(method.block_lens),
                          reserve=max(map(len, queries)) + job.max_new_tokens + 1 + headroom, on_layer=on_layer)
    sync(engine.device)
    host_prefill = time.perf_counter() - t0
    if job.cite:
        engine.collect_mass(cite_layers(engine.layers), job.max_new_tokens)
    barrier(engine.device, engine.hosts, engine.comm)
    t1 = time.perf_counter()
    results = []
    for i, query_ids in enumerate(queries):
        engine.rewind()  # no earlier question's or answer's KV reaches this one
        answer = answer_question(engine, job, query_ids, job.index + i, tokenizer, emit, faults, cancel)
        answer.prefill_s, answer.host_prefill_s = t1 - t0, host_prefill
        answer.block_tokens, answer.anchor_tokens = plan.block_len, plan.anchor_len
        answer.passing_tokens = call.passing_received
        results.append(answer)
    return results


def answer_question(engine: HostEngine, job: AskJob, query_ids: list[int], index: int, tokenizer,
                    emit: Callable[[Event], None], faults: Faults = NO_FAULTS,
                    cancel: CancelFlag | None = None) -> JobResult:
    """One question's query phase and decode over the prefilled cache (prefill fields left at 0); `cancel`: see
    `decode`."""
    rank = engine.rank
    if rank == 0:  # the answer starts: the launcher's decode watchdog counts from here (query phase included)
        emit(Event("progress", rank=0, phase="decode", done=0, total=job.max_new_tokens, question=index))
    if engine.mass is not None:
        engine.mass.reset()
    # every host's cache rewound and mass zeroed before any query phase: hosts that share a process decode in
    # one forward that reads all their caches (engine.decode_group)
    barrier(engine.device, engine.hosts, engine.comm)
    t1 = time.perf_counter()
    generator = torch.Generator().manual_seed(job.seed)  # every question samples as if it were asked alone
    stop = StopText(job.stop)

    def on_token(tokens: list[int]) -> bool:
        delta = stop.update(tokenizer.decode(tokens, skip_special_tokens=True)) if tokenizer is not None else ""
        if rank == 0 and job.stream and delta:
            emit(Event("token", rank=0, text=delta, question=index))
        if rank == 0:
            emit(Event("progress", rank=0, phase="decode", done=len(tokens), total=job.max_new_tokens,
                       question=index))
        return not stop.stopped

    decoded = decode(engine, query_ids, len(job.prompt.context_ids), job.max_new_tokens,
                     lambda logits: sample_next(logits, job.temperature, job.top_p, generator),
                     on_token, job.eos_ids, faults, cancel)
    mass = engine.gather_mass()  # --cite: the recorded rows folded into the mass, one collective (in decode_s)
    sync(engine.device)
    decode_s = time.perf_counter() - t1
    tail = stop.flush()
    if rank == 0 and job.stream and tail:
        emit(Event("token", rank=0, text=tail, question=index))
    return JobResult(
        answer=stop.text, token_ids=decoded.tokens, prefill_s=0.0, decode_s=decode_s, host_prefill_s=0.0,
        block_tokens=0, anchor_tokens=0, passing_tokens=0, finish_reason=decoded.finish_reason,
        first_logits=decoded.first_logits, query_s=decoded.query_s,
        context_mass=mass if rank == 0 else None,
    )
