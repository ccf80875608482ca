"""One request on one host: prefill, query phase, then decode with the KV cache left distributed.

Every host runs this same function. The last host samples each token and broadcasts it; every host decodes
the text itself (same tokenizer, same ids), so all agree on stop strings without another message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from apb_core.api import Event
from apb_core.engine import HostEngine
from apb_core.faults import fault_point
from apb_core.layout import plan_hosts, split_blocks
from apb_core.methods import MethodConfig
from apb_core.prompt import Prompt
from apb_core.sampling import StopText, sample_next


@dataclass
class Job:
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


@dataclass
class JobResult:
    answer: str
    token_ids: list[int]
    prefill_s: float  # from the common start to the last host's end of prefill
    decode_s: float  # query phase + generation
    host_prefill_s: float  # this host's own prefill time
    block_tokens: int
    anchor_tokens: int
    passing_tokens: int
    first_logits: torch.Tensor | None = None  # logits after the query phase (tests compare them)


def _sync(engine: HostEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def _barrier(engine: HostEngine) -> None:
    _sync(engine)
    if engine.hosts > 1:
        dist.barrier(group=engine.group)


def run_job(engine: HostEngine, job: Job, tokenizer, emit: Callable[[Event], None] | None = None) -> JobResult:
    """Answer one prompt. `emit` receives progress and (on rank 0) streamed token events."""
    emit = emit or (lambda event: None)
    prompt, method, rank = job.prompt, job.method, engine.rank
    ctx = prompt.context_ids
    plans = plan_hosts(
        ctx, engine.hosts, method.anchor_len, prompt.question_ids, prompt.insert_at,
        method.question_in_anchor, prompt.probe_ids if method.probe else [], len(ctx),
    )
    plan = plans[rank]
    block_lens = [e - s for s, e in split_blocks(len(ctx), engine.hosts)]
    engine.on_layer = lambda layer: emit(
        Event("progress", rank=rank, phase="prefill", done=layer + 1, total=engine.layers, question=job.index)
    )
    _barrier(engine)
    fault_point("prefill", rank)
    t0 = time.perf_counter()
    engine.prefill(plan, ctx, method.passing, block_lens, reserve=len(prompt.query_ids) + job.max_new_tokens + 1)
    _sync(engine)
    host_prefill = time.perf_counter() - t0
    _barrier(engine)
    t1 = time.perf_counter()
    engine.on_layer = None

    generator = torch.Generator().manual_seed(job.seed)
    stop = StopText(job.stop)
    tokens: list[int] = []
    logits = engine.step(prompt.query_ids, len(ctx))
    first_logits = logits.detach().cpu()
    pos = len(ctx) + len(prompt.query_ids)
    while len(tokens) < job.max_new_tokens:
        token = sample_next(logits, job.temperature, job.top_p, generator) if engine.is_last else 0
        if engine.hosts > 1:
            t = torch.tensor([token], dtype=torch.long, device=engine.device)
            dist.broadcast(t, src=engine.hosts - 1, group=engine.group)
            token = int(t.item())
        if not tokens:
            fault_point("decode", rank)  # after the first generated token
        if token in job.eos_ids:
            break
        tokens.append(token)
        delta = stop.update(tokenizer.decode(tokens, skip_special_tokens=True)) if tokenizer is not None else ""
        if rank == 0 and job.stream and delta:
            emit(Event("token", rank=0, text=delta, question=job.index))
        if rank == 0:
            emit(Event("progress", rank=0, phase="decode", done=len(tokens), total=job.max_new_tokens,
                       question=job.index))
        if stop.stopped or len(tokens) >= job.max_new_tokens:
            break
        logits = engine.step([token], pos)
        pos += 1
    _sync(engine)
    decode_s = time.perf_counter() - t1
    tail = stop.flush()
    if rank == 0 and job.stream and tail:
        emit(Event("token", rank=0, text=tail, question=job.index))
    return JobResult(
        answer=stop.text, token_ids=tokens, prefill_s=t1 - t0, decode_s=decode_s, host_prefill_s=host_prefill,
        block_tokens=plan.block_len, anchor_tokens=plan.anchor_len, passing_tokens=engine.passing_received,
        first_logits=first_logits,
    )
