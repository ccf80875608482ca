"""The request/event/result types shared by the engine, the launcher and the CLI.

The CLI builds an `AskRequest`, calls `apb_core.ask.run_ask(request, on_event)` and renders the `Event`s it
receives (progress, streamed tokens) and the `AskResult`s it returns. Everything here is plain data so it
can cross process boundaries (pickled through multiprocessing queues).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Method = Literal["apb", "star", "full"]


@dataclass
class AskRequest:
    """One `apb ask` invocation: a document, one or more questions, and how to run them."""

    document: str  # the document text (already read and decoded)
    questions: list[str]
    model: str | None = None  # local HF dir, .gguf file, or None for the embedded default model
    method: Method = "apb"
    hosts: int = 2
    device: str = "cpu"  # "cpu" or "cuda"
    workers: int | None = None  # worker processes; None: one per host (fewer: hosts take turns, same answers)
    anchor_len: int | None = None  # None: the default table (apb_core.layout.default_lengths)
    passing_len: int | str | None = None  # int, "all", or None for the default
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    truncate: Literal["none", "middle", "end"] = "none"
    dtype: str | None = None  # None: fp32 on CPU, bf16 on CUDA
    threads: int | None = None  # CPU threads per worker; None: cores // hosts
    allow_pickle: bool = False
    compressor: str = "query_aware"  # query_aware | retaining_heads | random
    retaining_heads: str | None = None  # safetensors file of Locret-style heads (compressor retaining_heads)
    question_in_anchor: bool = True
    system: str | None = None  # a system prompt (the chat template's system turn); None: the template's default
    auto_exact: bool = True  # apb runs exact where that costs about as much (apb_core.algorithm.methods)
    layout: str = "balanced"  # balanced | equal: how the context is cut into blocks (apb_core.algorithm.methods)
    # several questions: one prefill for all of them (True), one each (False), or None: one prefill wherever the
    # prefill does not read the question (exact layouts, star: the answers are the same), and for APB's
    # query-aware prefill apb_core.ask.APB_SHARED_DEFAULT
    shared_prefill: bool | None = None
    cite: bool = False  # collect the answer's attention over the document and return citations (AskResult)
    paged: bool = False  # the document is a PDF's text (`--- page N ---` lines): citations name pages


@dataclass
class Event:
    """Something a worker reports while it runs.

    kind: "phase" (a phase starts/ends: name in `phase`), "progress" (done/total within `phase`, e.g. layers of
    prefill, tokens of decode), "token" (streamed answer text in `text`, for question `question`), "log".
    """

    kind: str
    rank: int = 0
    phase: str = ""
    done: int = 0
    total: int = 0
    text: str = ""
    question: int = 0


@dataclass
class HostStats:
    rank: int
    block_tokens: int  # local context tokens this host keeps (exact KV)
    anchor_tokens: int
    passing_tokens: int  # tokens received in the passing block (per KV head), summed over layers' width
    prefill_s: float


@dataclass
class Citation:
    """A passage the answer attended to (`--cite`; apb_core.citations): lines line_start..line_end (1-based) of
    the document, on `page` for a PDF (None for text), its whitespace-collapsed text, and its share of the
    answer's attention mass on the document (0..1)."""

    line_start: int
    line_end: int
    text: str
    score: float
    page: int | None = None

    def as_json(self) -> dict:
        """One `citations` entry of the JSON (`apb ask --cite --json`, the server's `apb.citations`): page (PDFs
        only), line_start, line_end, text, score."""
        page = {} if self.page is None else {"page": self.page}
        return page | {"line_start": self.line_start, "line_end": self.line_end, "text": self.text,
                       "score": self.score}


@dataclass
class AskResult:
    """The answer to one question with its measurements (the `--json` object is built from this)."""

    question: str
    answer: str
    model: str
    method: str
    hosts: int
    device: str
    prompt_tokens: int
    context_tokens: int
    generated_tokens: int
    anchor_len: int
    passing_len: int | str
    # convert_s, load_s, tokenize_s (the run's set-up: the first answer only), prefill_s (the prefill that served
    # it, shared or not), query_s and decode_s (its own; decode_s includes query_s), total_s (its own wall time:
    # set-up, prefill and decode for the first answer of a prefill, decode alone for the next ones)
    timings: dict[str, float]
    prefill_tokens_per_s: float
    host_stats: list[HostStats] = field(default_factory=list)
    truncated: bool = False
    auto_exact: bool = False  # apb ran the exact layout (anchor 0, passing all): cheaper than compressing here
    compressor: str = "none"  # the scorer that chose passing tokens (MethodConfig.compressor): none when exact
    question_in_anchor: bool = False  # the anchor held the question (as ran)
    method_requested: str = ""  # the request's method (`method` is what ran: full on one host, auto-exact, ...)
    finish_reason: str = "stop"  # "stop" (end of sequence), "stop_string" (--stop), "length" (--max-new-tokens)
    dropped_tokens: int = 0  # document tokens cut by --truncate to fit the window
    layout: str = "equal"  # what cut the blocks: balanced (equal FLOPs per host) or equal (equal token counts)
    prefill: int = 0  # which prefill of the run served this answer (0, 1, ...: several answers may share one)
    shared_prefill: bool = False  # that prefill served several questions
    citations: list[Citation] | None = None  # --cite: best first (None: not asked, or offsets unavailable)
    workers: int = 0  # worker processes that ran the hosts (fewer than hosts: they took turns in each)
