"""`apb ask` as a library: a Session keeps the tokenizer and the hosts (with their models) alive across
questions and documents; `run_ask` answers one request's questions with one model load per worker, and where
the layout allows (AskRequest.shared_prefill) with one prefill for all of them."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from apb_core.algorithm.flops import ModelDims
from apb_core.algorithm.methods import MethodConfig, resolve_method
from apb_core.api import AskRequest, AskResult, Event, HostStats
from apb_core.citations import cite
from apb_core.dist.env import read_env
from apb_core.dist.launcher import start_hosts
from apb_core.dist.worker import WorkerSpec
from apb_core.errors import InputError
from apb_core.runtime.generate import AskJob
from apb_core.runtime.prompt import build_prompts, shared_prompt

# Several questions with APB's query-aware prefill (anchor and probe hold the question): one prefill for all of
# them (every question in the anchor and the probe) or one each. See docs/quality.md, "Shared prefill".
APB_SHARED_DEFAULT = True


def default_threads(hosts: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, hosts))


class Session:
    """Tokenizer + H hosts with the model loaded once; `answer()` any number of (document, question) pairs.

    `request` supplies the model, hosts, device and defaults; its document/questions are not used here.
    `start_method`: how the worker processes start (apb_core.dist.launcher.default_start_method says when a
    caller needs forkserver).
    """

    def __init__(self, request: AskRequest, on_event: Callable[[Event], None] | None = None,
                 start_method: str | None = None) -> None:
        from apb_core import models

        self.request = request
        self.emit = on_event or (lambda e: None)
        env = read_env()
        self.hosts = env.torchrun.world_size if env.torchrun else request.hosts
        if self.hosts < 1:
            raise InputError(f"--hosts must be at least 1 (got {self.hosts})")
        # worker processes (apb_core.dist.launcher); under torchrun every rank is one
        self.workers = self.hosts if env.torchrun else min(request.workers or self.hosts, self.hosts)
        self.source = models.resolve_model(request.model, allow_pickle=request.allow_pickle)
        # a GGUF's first run converts it (~20 s), timed apart from tokenizing and announced as its own phase
        self.convert_s = models.prepare(self.source, lambda text: self.emit(Event("phase", phase="convert", text=text)))
        spec = WorkerSpec(
            model=request.model, device=request.device, dtype=request.dtype,
            threads=request.threads or (default_threads(self.workers) if request.device == "cpu" else None),
            allow_pickle=request.allow_pickle, retaining_heads=request.retaining_heads, env=env,
        )
        # The workers start now and load their models while this process reads the tokenizer and tokenizes:
        # on the GPU machine each side took 10-18 s of imports and loading, one after the other (docs/benchmarks.md).
        import transformers  # noqa: F401  (imported before a fork, the workers inherit it instead of importing it)

        self.emit(Event("phase", phase="load"))
        self.runner = start_hosts(spec, self.hosts, self.emit, self.workers, start_method).start()
        try:
            self.emit(Event("phase", phase="tokenize"))
            t0 = time.perf_counter()
            self.tokenizer = models.load_tokenizer(self.source)
            config = models.load_config(self.source)
            self.window = models.model_window(config)
            self.dims = ModelDims.from_config(config)
            self.eos = _eos_ids(self.tokenizer)
            self.setup_s = time.perf_counter() - t0
        except BaseException:
            self.runner.__exit__(*sys.exc_info())
            raise
        self.load_s = 0.0
        self.prefills = 0  # prefills run so far (AskResult.prefill numbers them)

    def __enter__(self) -> Session:
        """Wait for the hosts; `load_s` is the slowest host's own load time (it overlaps tokenizing)."""
        self.runner.__enter__()
        self.load_s = max(self.runner.load_s)
        return self

    def __exit__(self, *exc) -> None:
        self.runner.__exit__(*exc)

    def answer(self, document: str, question: str, index: int = 0, answer_prefix: str = "",
               t_start: float | None = None, settings: AskRequest | None = None) -> AskResult:
        """Answer one question; `settings` (default: the session's request) gives the method, lengths, sampling
        and truncation (its document, questions, model, hosts and device are not read here)."""
        return self.answer_all(document, [question], index, [answer_prefix], t_start, settings)[0]

    def shares_prefill(self, method: MethodConfig, settings: AskRequest | None = None) -> bool:
        """Whether several questions go through one prefill under `method` (AskRequest.shared_prefill)."""
        req = settings or self.request
        if req.shared_prefill is not None:
            return req.shared_prefill
        return not method.reads_question or APB_SHARED_DEFAULT

    def answer_all(self, document: str, questions: list[str], index: int = 0,
                   answer_prefixes: list[str] | None = None, t_start: float | None = None,
                   settings: AskRequest | None = None, prefill_for: int | None = None) -> list[AskResult]:
        """Answer `questions` about `document` in order, over one prefill where `shares_prefill` says so (else
        one prefill each); questions are numbered index, index + 1, ... in events. `settings` as in `answer`.

        prefill_for: answer them all over one prefill made for questions[prefill_for] alone (its anchor and
        probe; the others are not in it). Where the layout reads the question, the other answers are what the
        server's `"apb": {"reuse": true}` gives; `apb eval --reuse-prefill` measures them."""
        req = settings or self.request
        if not questions or any(not q.strip() for q in questions):
            raise InputError("the question is empty")
        t0 = time.perf_counter()
        prompts = build_prompts(self.tokenizer, document, questions, self.window, req.max_new_tokens, req.truncate,
                                answer_prefixes, req.system)
        method = resolve_method(req.method, prompts[0].context_len, self.hosts, req.anchor_len, req.passing_len,
                                req.compressor, req.question_in_anchor, req.seed, self.dims, req.auto_exact,
                                req.layout, device=self.request.device)
        tokenize_s = time.perf_counter() - t0 + (self.setup_s if index == 0 else 0.0)
        start = t_start if t_start is not None else t0
        if prefill_for is not None or len(questions) > 1 and self.shares_prefill(method, req):
            groups = [list(range(len(questions)))]
        else:
            groups = [[i] for i in range(len(questions))]
        results = []
        for group in groups:
            t_group = time.perf_counter()
            self.emit(Event("phase", phase="prefill", question=index + group[0]))
            prefill = prompts[prefill_for] if prefill_for is not None else shared_prompt([prompts[i] for i in group])
            job = AskJob(prefill, method, req.max_new_tokens, req.temperature,
                         req.top_p, req.seed, list(req.stop), self.eos, index=index + group[0],
                         query_parts=[prompts[i].query_ids for i in group] if len(group) > 1 else [],
                         cite=req.cite)
            per_host = self.runner.run(job)  # [host][question]
            for j, i in enumerate(group):
                lead = per_host[0][j]
                first = index + i == 0  # the run's first answer: its total counts from the start (load included)
                if first:
                    total = t_group - start + lead.prefill_s + lead.decode_s
                else:
                    total = (lead.prefill_s if j == 0 else 0.0) + lead.decode_s
                timings = {
                    "convert_s": self.convert_s if first else 0.0, "load_s": self.load_s if first else 0.0,
                    "tokenize_s": tokenize_s if i == 0 else 0.0, "prefill_s": lead.prefill_s,
                    "query_s": lead.query_s, "decode_s": lead.decode_s, "total_s": total,
                }
                results.append(self._result(req, questions[i], prompts[i], method, timings,
                                            [h[j] for h in per_host], len(group) > 1, document))
            self.prefills += 1
        return results

    def _result(self, req: AskRequest, question: str, prompt, method: MethodConfig, timings: dict[str, float],
                per_host: list, shared: bool, document: str = "") -> AskResult:
        lead = per_host[0]
        citations = None
        if req.cite and lead.context_mass is not None:
            citations = cite(self.tokenizer, document, prompt, lead.context_mass, req.paged)
        return AskResult(
            question=question, answer=lead.answer.strip(), model=self.source.name, method=method.name,
            hosts=self.hosts, workers=self.workers, device=self.request.device, prompt_tokens=prompt.total_len,
            context_tokens=prompt.context_len, generated_tokens=len(lead.token_ids),
            anchor_len=method.anchor_len, passing_len=method.passing_len, timings=timings,
            prefill_tokens_per_s=prompt.context_len / max(lead.prefill_s, 1e-9),
            host_stats=[
                HostStats(r, h.block_tokens, h.anchor_tokens, h.passing_tokens, h.host_prefill_s)
                for r, h in enumerate(per_host)
            ],
            truncated=prompt.truncated,
            auto_exact=method.auto_exact, compressor=method.compressor,
            question_in_anchor=method.question_in_anchor,
            layout=method.layout,
            method_requested=req.method, finish_reason=lead.finish_reason, dropped_tokens=prompt.dropped_tokens,
            prefill=self.prefills, shared_prefill=shared, citations=citations,
        )


def run_ask(request: AskRequest, on_event: Callable[[Event], None] | None = None) -> list[AskResult]:
    """Answer every question of `request` about its document with one model load per worker."""
    t_start = time.perf_counter()
    if not request.questions or any(not q.strip() for q in request.questions):
        raise InputError("the question is empty")
    session = Session(request, on_event)
    # tokenize every question first: a prompt that does not fit (or has fewer tokens than hosts) fails before
    # any worker starts
    prompts = build_prompts(session.tokenizer, request.document, request.questions, session.window,
                            request.max_new_tokens, request.truncate, system=request.system)
    resolve_method(request.method, prompts[0].context_len, session.hosts, request.anchor_len, request.passing_len,
                   request.compressor, request.question_in_anchor, request.seed)
    with session:
        return session.answer_all(request.document, request.questions, t_start=t_start)


def _eos_ids(tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(ids)
