"""`apb ask` as a library call: read options, tokenize, run the hosts, and report answers with timings."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from apb_core.api import AskRequest, AskResult, Event, HostStats
from apb_core.errors import InputError
from apb_core.generate import Job, run_job
from apb_core.launcher import Workers, in_torchrun
from apb_core.methods import resolve_method
from apb_core.prompt import build_prompt
from apb_core.worker import WorkerSpec, device_for, init_group, load_host


class InlineHost:
    """Run the engine in this process: one host (no spawn cost), or one torchrun rank."""

    def __init__(self, spec: WorkerSpec, on_event: Callable[[Event], None]) -> None:
        self.rank = int(os.environ.get("RANK", "0")) if in_torchrun() else 0
        self.hosts = int(os.environ.get("WORLD_SIZE", "1")) if in_torchrun() else 1
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.on_event = on_event if self.rank == 0 else (lambda e: None)
        device = device_for(spec, local)
        init_group(self.rank, self.hosts, device, "env://")
        self.engine, self.tokenizer, load_s = load_host(spec, self.rank, self.hosts, device)
        self.load_s = [load_s]

    def __enter__(self) -> InlineHost:
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        if self.hosts > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def run(self, job: Job) -> list:
        return [run_job(self.engine, job, self.tokenizer, emit=self.on_event)]


def default_threads(hosts: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, hosts))


def run_ask(request: AskRequest, on_event: Callable[[Event], None] | None = None) -> list[AskResult]:
    """Answer every question of `request` about its document with one model load per worker."""
    from apb_core import model as models

    emit = on_event or (lambda e: None)
    t_start = time.perf_counter()
    if not request.questions or any(not q.strip() for q in request.questions):
        raise InputError("the question is empty")
    hosts = int(os.environ.get("WORLD_SIZE", "1")) if in_torchrun() else request.hosts
    if hosts < 1:
        raise InputError(f"--hosts must be at least 1 (got {hosts})")

    emit(Event("phase", phase="tokenize"))
    t0 = time.perf_counter()
    source = models.resolve_model(request.model, allow_pickle=request.allow_pickle)
    tokenizer = models.load_tokenizer(source)
    window = models.model_window(models.load_config(source))
    reserve = request.max_new_tokens
    prompts = [
        build_prompt(tokenizer, request.document, q, window, reserve, request.truncate) for q in request.questions
    ]
    methods = [
        resolve_method(request.method, p.context_len, hosts, request.anchor_len, request.passing_len,
                       request.compressor, request.question_in_anchor, request.seed)
        for p in prompts
    ]
    eos = _eos_ids(tokenizer)
    tokenize_s = time.perf_counter() - t0

    spec = WorkerSpec(
        model=request.model, device=request.device, dtype=request.dtype,
        threads=request.threads or (default_threads(hosts) if request.device == "cpu" else None),
        allow_pickle=request.allow_pickle, retaining_heads=request.retaining_heads,
    )
    emit(Event("phase", phase="load"))
    t0 = time.perf_counter()
    runner = InlineHost(spec, emit) if hosts == 1 or in_torchrun() else Workers(spec, hosts, emit)
    results: list[AskResult] = []
    with runner:
        load_s = time.perf_counter() - t0
        for i, (question, prompt, method) in enumerate(zip(request.questions, prompts, methods, strict=True)):
            emit(Event("phase", phase="prefill", question=i))
            job = Job(prompt, method, request.max_new_tokens, request.temperature, request.top_p, request.seed,
                      list(request.stop), eos, index=i)
            per_host = runner.run(job)
            lead = per_host[0]
            results.append(
                AskResult(
                    question=question, answer=lead.answer.strip(), model=source.name, method=method.name,
                    hosts=hosts, device=request.device, prompt_tokens=prompt.total_len,
                    context_tokens=prompt.context_len, generated_tokens=len(lead.token_ids),
                    anchor_len=method.anchor_len, passing_len=method.passing_len,
                    timings={
                        "load_s": load_s, "tokenize_s": tokenize_s, "prefill_s": lead.prefill_s,
                        "decode_s": lead.decode_s, "total_s": time.perf_counter() - t_start,
                    },
                    prefill_tokens_per_s=prompt.context_len / max(lead.prefill_s, 1e-9),
                    host_stats=[
                        HostStats(r, h.block_tokens, h.anchor_tokens, h.passing_tokens, h.host_prefill_s)
                        for r, h in enumerate(per_host)
                    ],
                    truncated=prompt.truncated,
                )
            )
    return results


def _eos_ids(tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)
