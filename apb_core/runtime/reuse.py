"""The server's job: answer a question over a document KV the hosts keep parked (the serve document cache), or
prefill it anew with room kept for later questions, and park it when the cache keeps it.

Reuse is exact only where the prefill does not read the question (`MethodConfig.reads_question` false: full,
star, apb where auto-exact chose the exact layout). Where it does (APB compressing: the anchor and the
query-aware compression read the question), a request may opt in (`"apb": {"reuse": true}`) to be answered over
the prefill kept for an earlier question: the same job, approximate (docs/quality.md, "Reusing an APB prefill",
measures it). The launcher's cache (apb_core.serve.cache) decides
everything, including that the parked KV has room for this question and answer; every host runs the same job
and so parks, resumes and drops the same keys (HostEngine.park / resume / drop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from apb_core.api import Event
from apb_core.runtime.attention_mass import cite_layers
from apb_core.runtime.generate import AskJob, JobResult, answer_question, run_questions

HEADROOM = 1024  # query + answer tokens the last host keeps room for beyond the request's own (later questions)


def room_tokens(query_len: int, max_new_tokens: int) -> int:
    """The tokens past the document that a kept prefill reserves on the last host (this question, its answer and
    its end, plus HEADROOM for later ones)."""
    return needed_tokens(query_len, max_new_tokens) + HEADROOM


def needed_tokens(query_len: int, max_new_tokens: int) -> int:
    """The room past the document that one question needs: its query part, its answer, the end token."""
    return query_len + max_new_tokens + 1


@dataclass
class ServeJob:
    """`ask` (one question) as the cache plans it. `drop`: parked KV to free first (evictions). `reuse`: resume
    `key`'s parked KV and run only the query phase and decode over it, then park it back (also when the
    question is cancelled: the KV is whole). Else a prefill that keeps HEADROOM spare, parked under `key`
    afterwards when `keep` (also when the decode is cancelled: the flag is read only after the prefill, which is
    whole, so the launcher's cache records it either way). Returns [JobResult] like AskJob; `prefill_s == 0` on
    reuse."""

    ask: AskJob
    key: str = ""
    reuse: bool = False
    keep: bool = False
    drop: tuple[str, ...] = ()

    @property
    def context_len(self) -> int:
        return self.ask.context_len

    def run(self, host, emit: Callable[[Event], None]) -> list[JobResult]:
        engine, job = host.engine, self.ask
        for key in self.drop:
            engine.drop(key)
        if self.reuse:
            return [self._resumed(host, emit)]
        if self.keep:
            engine.release()  # the kept KV gets buffers of its own size (the cache's byte count), not a leftover
        results = run_questions(engine, job, host.tokenizer, emit, host.faults, headroom=HEADROOM,
                                cancel=host.cancel)
        if self.keep:
            engine.park(self.key)
        return results

    def _resumed(self, host, emit: Callable[[Event], None]) -> JobResult:
        engine, job = host.engine, self.ask
        engine.resume(self.key)
        try:
            engine.rewind()  # the document-only state: no earlier question or answer is seen
            if job.cite:
                engine.collect_mass(cite_layers(engine.layers), job.max_new_tokens)
            result = answer_question(engine, job, job.queries[0], job.index, host.tokenizer, emit, host.faults,
                                     host.cancel)
            result.block_tokens = engine.context_len
        finally:
            engine.park(self.key)
        return result
