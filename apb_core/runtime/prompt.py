"""Prompt: the chat-templated prompt split into context (head + document) and query part (question + tail).

The split is found by rendering the model's chat template around two sentinels, so it works for any template
(system prompts included) and the question can be placed right where the user turn begins (`insert_at`).
"""

from __future__ import annotations

from dataclasses import dataclass

from apb_core.errors import InputError

_DOC, _Q = "\u27e6APB-DOC\u27e7", "\u27e6APB-Q\u27e7"
QUESTION_FMT = "\n\nQuestion: {question}"
ANCHOR_QUESTION_FMT = "Question: {question}\n\n"


@dataclass
class Prompt:
    context_ids: list[int]  # chat-template head + document
    query_ids: list[int]  # question + template tail (+ answer prefix)
    question_ids: list[int]  # the question as inserted into the anchor
    probe_ids: list[int]  # query_ids' prefix that holds the question (the compressor's probe)
    insert_at: int  # where the user turn begins in context_ids
    truncated: bool = False
    dropped_tokens: int = 0  # document tokens cut to fit the window (truncate middle|end)
    probe_lens: tuple[int, ...] = ()  # several questions (shared_prompt): each one's share of probe_ids

    @property
    def context_len(self) -> int:
        return len(self.context_ids)

    @property
    def total_len(self) -> int:
        return len(self.context_ids) + len(self.query_ids)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def encode_document(tokenizer, document: str) -> list[int]:
    """The document's token ids as build_prompt makes them (its `doc_ids`, for callers that keep them)."""
    return _encode(tokenizer, document)


def template_parts(tokenizer, system: str | None = None) -> tuple[str, str, str]:
    """(head, middle, tail) such that prompt = head + document + middle + question + tail.

    `system`: a system prompt, rendered as the template's system turn (so it sits in `head`, before the user
    turn where the anchor's question goes); None keeps the template's own default.
    """
    body = _DOC + QUESTION_FMT.format(question=_Q)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        text = tokenizer.apply_chat_template(
            [*messages, {"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
    else:
        bos = tokenizer.bos_token or ""
        text = bos + (f"{system}\n\n" if system else "") + body + "\nAnswer:"
    head, rest = text.split(_DOC, 1)
    middle, tail = rest.split(_Q, 1)
    return head, middle, tail


def build_prompt(
    tokenizer,
    document: str,
    question: str,
    window: int,
    reserve: int,
    truncate: str = "none",
    answer_prefix: str = "",
    system: str | None = None,
    doc_ids: list[int] | None = None,
) -> Prompt:
    """Tokenize the prompt parts; cut the document (middle or end) if asked and it does not fit the window.

    `reserve`: tokens kept free for the answer. `doc_ids`: encode_document(tokenizer, document) when the caller
    has it already (not modified). Raises InputError when the prompt does not fit and truncate is "none" (the
    message states both numbers).
    """
    head, middle, tail = template_parts(tokenizer, system)
    head_ids = _encode(tokenizer, head)
    doc_ids = encode_document(tokenizer, document) if doc_ids is None else doc_ids
    query_ids = _encode(tokenizer, middle + question + tail + answer_prefix)
    probe_len = len(_encode(tokenizer, middle + question))
    total = len(head_ids) + len(doc_ids) + len(query_ids) + reserve
    truncated, dropped = False, 0
    if total > window:
        over = total - window
        if truncate == "none":
            raise InputError(
                f"the prompt needs {total} tokens (document, question and {reserve} new tokens) but the model "
                f"window is {window}; use --truncate middle|end or a shorter document"
            )
        if over >= len(doc_ids):
            raise InputError(f"the question and answer alone need {total - len(doc_ids)} of {window} tokens")
        if truncate == "end":
            doc_ids = doc_ids[: len(doc_ids) - over]
        else:
            keep = len(doc_ids) - over
            doc_ids = doc_ids[: keep // 2] + doc_ids[len(doc_ids) - (keep - keep // 2) :]
        truncated, dropped = True, over
    return Prompt(
        context_ids=head_ids + doc_ids,
        query_ids=query_ids,
        question_ids=_encode(tokenizer, ANCHOR_QUESTION_FMT.format(question=question)),
        probe_ids=query_ids[: min(probe_len, len(query_ids))],
        insert_at=len(head_ids),
        truncated=truncated,
        dropped_tokens=dropped,
    )


def build_prompts(tokenizer, document: str, questions: list[str], window: int, reserve: int,
                  truncate: str = "none", answer_prefixes: list[str] | None = None,
                  system: str | None = None, doc_ids: list[int] | None = None) -> list[Prompt]:
    """One prompt per question, all with the same context (so that one prefill can serve them): where the
    document must be cut, every prompt is cut as much as the longest question's needs. `doc_ids`: see
    build_prompt (the document is tokenized once here either way)."""
    prefixes = answer_prefixes or [""] * len(questions)
    doc_ids = encode_document(tokenizer, document) if doc_ids is None else doc_ids
    prompts = [build_prompt(tokenizer, document, q, window, reserve, truncate, p, system, doc_ids)
               for q, p in zip(questions, prefixes, strict=True)]
    if len({len(p.context_ids) for p in prompts}) > 1:
        longest = max(len(p.query_ids) for p in prompts)
        prompts = [build_prompt(tokenizer, document, q, window, reserve + longest - len(p.query_ids), truncate, a,
                                system, doc_ids)
                   for q, a, p in zip(questions, prefixes, prompts, strict=True)]
    return prompts


def shared_prompt(prompts: list[Prompt]) -> Prompt:
    """The prefill prompt of several questions about one context: every question in the anchor, one after the
    other, and every question's probe (apb_core.algorithm.layout). Its query_ids are the first question's."""
    first = prompts[0]
    if any(p.context_ids != first.context_ids for p in prompts):
        raise ValueError("a shared prefill needs one context for every question")
    if len(prompts) == 1:
        return first
    return Prompt(
        context_ids=first.context_ids,
        query_ids=first.query_ids,
        question_ids=[t for p in prompts for t in p.question_ids],
        probe_ids=[t for p in prompts for t in p.probe_ids],
        insert_at=first.insert_at,
        truncated=first.truncated,
        dropped_tokens=first.dropped_tokens,
        probe_lens=tuple(len(p.probe_ids) for p in prompts),
    )
