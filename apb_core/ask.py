"""`apb ask` as a library: a Session keeps the tokenizer and the hosts (with their models) alive across
questions and documents; `run_ask` answers one request's questions with one model load per worker."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from apb_core.api import AskRequest, AskResult, Event, HostStats
from apb_core.errors import InputError, WorkerError
from apb_core.flops import ModelDims
from apb_core.generate import Job, run_job
from apb_core.launcher import Workers, in_torchrun
from apb_core.methods import resolve_method
from apb_core.prompt import build_prompt
from apb_core.worker import WorkerSpec, describe_oom, device_for, init_group, is_oom, load_host


class InlineHost:
    """Run the engine in this process: one host (no start-up cost at all), or one torchrun rank."""

    def __init__(self, spec: WorkerSpec, on_event: Callable[[Event], None]) -> None:
        self.rank = int(os.environ.get("RANK", "0")) if in_torchrun() else 0
        self.hosts = int(os.environ.get("WORLD_SIZE", "1")) if in_torchrun() else 1
        self.spec = spec
        self.on_event = on_event if self.rank == 0 else (lambda e: None)

    def __enter__(self) -> InlineHost:
        device = device_for(self.spec, int(os.environ.get("LOCAL_RANK", "0")))
        init_group(self.rank, self.hosts, device, "env://")
        try:
            self.engine, self.tokenizer, load_s = load_host(self.spec, self.rank, self.hosts, device)
        except Exception as exc:
            if not is_oom(exc):
                raise
            raise WorkerError(describe_oom(exc, self.rank, self.hosts, None, None)) from None
        self.load_s = [load_s]
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        if self.hosts > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def run(self, job: Job) -> list:
        try:
            return [run_job(self.engine, job, self.tokenizer, emit=self.on_event)]
        except Exception as exc:  # the same one line as a worker's
            if not is_oom(exc):
                raise
            raise WorkerError(describe_oom(exc, self.rank, self.hosts, job, self.engine)) from None


def default_threads(hosts: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, hosts))


class Session:
    """Tokenizer + H hosts with the model loaded once; `answer()` any number of (document, question) pairs.

    `request` supplies the model, hosts, device and defaults; its document/questions are not used here.
    """

    def __init__(self, request: AskRequest, on_event: Callable[[Event], None] | None = None) -> None:
        from apb_core import model as models

        self.request = request
        self.emit = on_event or (lambda e: None)
        self.hosts = int(os.environ.get("WORLD_SIZE", "1")) if in_torchrun() else request.hosts
        if self.hosts < 1:
            raise InputError(f"--hosts must be at least 1 (got {self.hosts})")
        self.emit(Event("phase", phase="tokenize"))
        t0 = time.perf_counter()
        self.source = models.resolve_model(request.model, allow_pickle=request.allow_pickle)
        self.tokenizer = models.load_tokenizer(self.source)
        config = models.load_config(self.source)
        self.window = models.model_window(config)
        self.dims = ModelDims.from_config(config)
        self.eos = _eos_ids(self.tokenizer)
        self.setup_s = time.perf_counter() - t0
        spec = WorkerSpec(
            model=request.model, device=request.device, dtype=request.dtype,
            threads=request.threads or (default_threads(self.hosts) if request.device == "cpu" else None),
            allow_pickle=request.allow_pickle, retaining_heads=request.retaining_heads,
        )
        self.runner = InlineHost(spec, self.emit) if self.hosts == 1 or in_torchrun() else Workers(
            spec, self.hosts, self.emit)
        self.load_s = 0.0

    def __enter__(self) -> Session:
        self.emit(Event("phase", phase="load"))
        t0 = time.perf_counter()
        self.runner.__enter__()
        self.load_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.runner.__exit__(*exc)

    def answer(self, document: str, question: str, index: int = 0, answer_prefix: str = "",
               t_start: float | None = None, **overrides) -> AskResult:
        """Answer one question; `overrides` replace request fields (method, anchor_len, passing_len, ...)."""
        req = self.request
        opt = {f: overrides.get(f, getattr(req, f)) for f in (
            "method", "anchor_len", "passing_len", "compressor", "question_in_anchor", "seed", "max_new_tokens",
            "temperature", "top_p", "stop", "truncate", "auto_exact")}
        if not question.strip():
            raise InputError("the question is empty")
        t0 = time.perf_counter()
        prompt = build_prompt(self.tokenizer, document, question, self.window, opt["max_new_tokens"],
                              opt["truncate"], answer_prefix)
        method = resolve_method(opt["method"], prompt.context_len, self.hosts, opt["anchor_len"],
                                opt["passing_len"], opt["compressor"], opt["question_in_anchor"], opt["seed"],
                                self.dims, opt["auto_exact"])
        tokenize_s = time.perf_counter() - t0 + (self.setup_s if index == 0 else 0.0)
        self.emit(Event("phase", phase="prefill", question=index))
        job = Job(prompt, method, opt["max_new_tokens"], opt["temperature"], opt["top_p"], opt["seed"],
                  list(opt["stop"]), self.eos, index=index)
        per_host = self.runner.run(job)
        lead = per_host[0]
        start = t_start if t_start is not None else t0
        return AskResult(
            question=question, answer=lead.answer.strip(), model=self.source.name, method=method.name,
            hosts=self.hosts, device=req.device, prompt_tokens=prompt.total_len,
            context_tokens=prompt.context_len, generated_tokens=len(lead.token_ids),
            anchor_len=method.anchor_len, passing_len=method.passing_len,
            timings={
                "load_s": self.load_s, "tokenize_s": tokenize_s, "prefill_s": lead.prefill_s,
                "decode_s": lead.decode_s, "total_s": time.perf_counter() - start,
            },
            prefill_tokens_per_s=prompt.context_len / max(lead.prefill_s, 1e-9),
            host_stats=[
                HostStats(r, h.block_tokens, h.anchor_tokens, h.passing_tokens, h.host_prefill_s)
                for r, h in enumerate(per_host)
            ],
            truncated=prompt.truncated,
            auto_exact=method.auto_exact,
        )


def run_ask(request: AskRequest, on_event: Callable[[Event], None] | None = None) -> list[AskResult]:
    """Answer every question of `request` about its document with one model load per worker."""
    t_start = time.perf_counter()
    if not request.questions or any(not q.strip() for q in request.questions):
        raise InputError("the question is empty")
    session = Session(request, on_event)
    # tokenize every question first: a prompt that does not fit (or has fewer tokens than hosts) fails before
    # any worker starts
    for q in request.questions:
        prompt = build_prompt(session.tokenizer, request.document, q, session.window, request.max_new_tokens,
                              request.truncate)
        resolve_method(request.method, prompt.context_len, session.hosts, request.anchor_len, request.passing_len,
                       request.compressor, request.question_in_anchor, request.seed)
    with session:
        return [session.answer(request.document, q, i, t_start=t_start) for i, q in enumerate(request.questions)]


def _eos_ids(tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)
