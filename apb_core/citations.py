"""Citations (`apb ask --cite`): the passages of the document that the answer attended to most.

The decode hands back, for every context token, the attention mass the answer put on it
(apb_core.runtime.attention_mass: the rows that predicted each answer token, upper quarter of the layers, heads
summed, merged over hosts). Here that mass becomes passages:
1. token -> character span of the document: the document is tokenized on its own (build_prompt does the same),
   so a fast tokenizer's offsets map document token i to context token insert_at + i; the chat-template head
   (context tokens before insert_at) is left out, and the question and answer were never in the context;
2. the document is cut into passages of at most PASSAGE_CHARS characters: consecutive lines are packed
   together, a longer line is cut at sentence ends (else at spaces); blank lines and the `--- page N ---`
   markers of PDFs end a passage, so a passage never spans two pages;
3. a passage's mass is the sum over the tokens that start in it; its score is that mass over the mass of the
   whole document (a share, 0..1); the best `top` passages, best first, are the citations.
Why raw sums over short passages: the mass of a needle sits on a handful of tokens, and a cap on the passage
length keeps long passages from winning on their length alone.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import torch

from apb_core.api import Citation
from apb_core.runtime.prompt import Prompt

PASSAGE_CHARS = 300  # a passage packs lines (or sentences of a long line) up to this many characters
CITE_TOP = 3
PAGE_MARK = re.compile(r"^--- page (\d+) ---$")  # apb_core.documents.PAGE_SEPARATOR
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Passage:
    start: int  # character offsets in the document, end exclusive
    end: int
    line_start: int  # 1-based, inclusive
    line_end: int
    page: int | None


def _pieces(text: str, base: int, limit: int) -> list[tuple[int, int]]:
    """(start, end) spans covering `text` (offset `base`), each at most `limit` characters where the text
    allows: cut after sentence ends, else before the last space within the limit, else hard."""
    bounds = [0] + [m.start() for m in _SENTENCE_END.finditer(text)] + [len(text)]  # " The": the next one's
    spans = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        while b - a > limit:
            cut = text.rfind(" ", a + 1, a + limit)
            cut = cut if cut > a else a + limit
            spans.append((a, cut))
            a = cut
        if b > a:
            spans.append((a, b))
    return [(base + a, base + b) for a, b in spans]


def passages(document: str, paged: bool = False, limit: int = PASSAGE_CHARS) -> list[Passage]:
    """The document cut into passages (see the module docstring); `paged`: a PDF's text, pages numbered from 1
    and advanced at each `--- page N ---` line."""
    out: list[Passage] = []
    page = 1 if paged else None
    current: Passage | None = None
    offset = 0
    for number, line in enumerate(document.split("\n"), start=1):
        start, offset = offset, offset + len(line) + 1
        mark = PAGE_MARK.match(line.strip()) if paged else None
        if mark or not line.strip():
            if mark:
                page = int(mark.group(1))
            current = None
            continue
        for a, b in _pieces(line, start, limit):
            if current is not None and current.page == page and b - current.start <= limit:
                current.end, current.line_end = b, number
            else:
                current = Passage(a, b, number, number, page)
                out.append(current)
    return out


def document_token_starts(tokenizer, document: str, prompt: Prompt) -> list[int] | None:
    """The document character where each context token from prompt.insert_at on starts ([context_len -
    insert_at]); None where the offsets cannot be recovered (a slow tokenizer, or tokens that differ)."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc.input_ids, enc.offset_mapping
    doc_ids = prompt.context_ids[prompt.insert_at:]
    if ids == doc_ids:
        return [a for a, _ in offsets]
    keep = len(doc_ids)
    if ids[:keep] == doc_ids:  # --truncate end
        return [a for a, _ in offsets[:keep]]
    head = keep // 2  # --truncate middle keeps keep // 2 tokens from the start and the rest from the end
    tail = keep - head
    if ids[:head] + ids[len(ids) - tail:] == doc_ids:
        return [a for a, _ in offsets[:head] + offsets[len(offsets) - tail:]]
    return None


def cite(tokenizer, document: str, prompt: Prompt, mass: torch.Tensor, paged: bool = False,
         top: int = CITE_TOP) -> list[Citation] | None:
    """The `top` passages with the most attention mass, best first; mass [context_len] per context token.
    None when token offsets cannot be recovered (the caller warns)."""
    starts = document_token_starts(tokenizer, document, prompt)
    if starts is None or mass.shape[0] != prompt.context_len:
        return None
    doc_mass = mass[prompt.insert_at:].double().tolist()
    total = sum(doc_mass)
    cut = passages(document, paged)
    if not cut or total <= 0:
        return []
    sums = [0.0] * len(cut)
    begins = [p.start for p in cut]
    for char, m in zip(starts, doc_mass, strict=True):
        i = bisect.bisect_right(begins, char) - 1
        if i < 0 or char >= cut[i].end:
            # a token that starts on a line break or a space before a passage: the next passage's
            i += 1
            if i >= len(cut):
                continue
        sums[i] += m
    best = sorted(range(len(cut)), key=lambda i: sums[i], reverse=True)[:top]
    return [
        Citation(line_start=cut[i].line_start, line_end=cut[i].line_end,
                 text=" ".join(document[cut[i].start:cut[i].end].split()), score=round(sums[i] / total, 4),
                 page=cut[i].page)
        for i in best if sums[i] > 0
    ]
