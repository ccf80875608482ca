"""The server's job: answer a question over the document KV that the previous prefill left on the hosts (the
serve document cache), or prefill it anew with room kept for later questions.

Reuse is exact only where the prefill does not read the question (`MethodConfig.reads_question` false: full,
star, apb where auto-exact chose the exact layout); the caller (apb_core.serve.cache) decides that and that the
hosts still hold this document's KV. Every host runs the same job; the last host says whether its cache has
room for this question and answer (one broadcast), so all hosts take the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from apb_core.api import Event
from apb_core.runtime.generate import AskJob, JobResult, answer_question, run_questions

HEADROOM = 1024  # query + answer tokens the last host keeps room for beyond the request's own (later questions)


@dataclass
class ServeJob:
    """`ask` (one question) run with `reuse`: over the cached document KV when true (query phase and decode
    only; falls back to a prefill when the last host lacks room), else a prefill that keeps HEADROOM spare.
    Returns [JobResult] like AskJob; `prefill_s == 0` on a cache hit."""

    ask: AskJob
    reuse: bool = False

    @property
    def context_len(self) -> int:
        return self.ask.context_len

    def run(self, host, emit: Callable[[Event], None]) -> list[JobResult]:
        engine, job = host.engine, self.ask
        query_ids = job.queries[0]
        need = len(query_ids) + job.max_new_tokens + 1
        if self.reuse:
            fits = engine.cache is not None and engine.cache.capacity >= engine.context_len + need
            if engine.broadcast_token(int(fits) if engine.is_last else 0):
                engine.rewind()  # the document-only state: no earlier question or answer is seen
                result = answer_question(engine, job, query_ids, job.index, host.tokenizer, emit, host.faults)
                result.block_tokens = engine.context_len
                return [result]
        return run_questions(engine, job, host.tokenizer, emit, host.faults, headroom=HEADROOM)
