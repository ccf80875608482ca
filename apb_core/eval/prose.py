"""The real-prose haystack: the English text of the Python Language Reference, shipped with every CPython.

RULER pads its essay tasks with Paul Graham's essays, which it downloads. apb needs real prose offline, so it
reads the documentation that CPython installs as `pydoc_data.topics` (the text `help("if")` prints: the
Language Reference and the library's built-in types chapter, ~1 MB). Licence: Python's documentation is
distributed under the PSF License Agreement with the interpreter (https://docs.python.org/3/license.html).

Why this text: it is written by people, not generated, so sentences do not repeat; it has numbers in it as real
text has ("PEP 3115", "2**31", "Python 3.3"), so an answer value is not the only number in the document; and it
is installed wherever apb runs, with no hub and no download.

Cleaning (deterministic): topics in sorted key order; a paragraph (blank-line separated) is kept when its
lines share one indentation (code and grammar blocks indent their continuation lines), it has at least 12
words, ends like a sentence, contains no grammar (`::=`) or interpreter prompt (`>>>`), and is at least 85 %
letters and spaces; lines are reflowed into one, and a paragraph that repeats a sentence of an earlier one
(30 characters or more) is dropped. What remains is
~210 KB, ~48K tokens for the SmolLM2 tokenizer, and no paragraph twice.

No verbatim repetition: a haystack starts at a random paragraph and runs to the end, then wraps to the start,
so it repeats nothing until it is longer than the whole corpus. `apb_core.eval.haystack.text_haystack` uses it
only when the corpus has at least as many tokens as the sample's target (the haystack is part of the sample, so
it is shorter still), and otherwise falls back to the generated essays (`apb_core.eval.essay`), saying so in the
sample's `haystack` field. The text depends on the Python minor version (`PROSE_NAME` names it).
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache

PROSE_NAME = f"python{sys.version_info.major}.{sys.version_info.minor}-docs"  # recorded in every sample
MIN_WORDS = 12
MIN_LETTER_SHARE = 0.85
MIN_REPEAT_CHARS = 30  # a paragraph with a sentence this long that an earlier paragraph has is dropped


def _keep(lines: list[str]) -> str | None:
    """The reflowed paragraph, or None when the block is code, grammar, a heading or too short (see top)."""
    if not lines or len({len(line) - len(line.lstrip()) for line in lines}) > 1:
        return None
    if any(re.fullmatch(r"[*=\-~^]{3,}", line.strip()) for line in lines):
        return None
    text = re.sub(r"\s+", " ", " ".join(line.strip() for line in lines))
    if len(text.split()) < MIN_WORDS or "::=" in text or ">>>" in text or not text.endswith((".", ":")):
        return None
    if sum(c.isalpha() or c.isspace() for c in text) < MIN_LETTER_SHARE * len(text):
        return None
    return text


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """The cleaned paragraphs, each once, in a fixed order; () where this Python ships no pydoc_data."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it: callers fall back to the generated essays
        return ()
    paragraphs: list[str] = []
    seen: set[str] = set()  # sentences already used: the reference repeats some sentences across topics
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = _keep([line for line in block.split("\n") if line.strip()])
            if text is None:
                continue
            sentences = [x for x in re.split(r"(?<=[.!?:])\s+", text) if len(x) >= MIN_REPEAT_CHARS]
            if any(x in seen for x in sentences):
                continue
            seen.update(sentences)
            paragraphs.append(text)
    return tuple(paragraphs)


@lru_cache(maxsize=1)
def prose_text() -> str:
    """Every paragraph once, separated by blank lines."""
    return "\n\n".join(prose_paragraphs())


@lru_cache(maxsize=1)
def prose_units() -> tuple[tuple[str, ...], tuple[bool, ...], tuple[bool, ...]]:
    """(words with their trailing whitespace, sentence_start, paragraph_start), as `essay.essay_units`: a needle
    may go before word i when sentence_start[i]; a haystack may begin where paragraph_start[i]."""
    text = prose_text()
    if not text:
        return (), (), ()
    words = re.findall(r"\S+\s*", text)
    words[-1] = words[-1].rstrip() + "\n\n"
    sentence_start = [True] + [re.search(r"[.!?:]\"?\s+$", w) is not None for w in words[:-1]]
    paragraph_start = [True] + [w.endswith("\n\n") for w in words[:-1]]
    return tuple(words), tuple(sentence_start), tuple(paragraph_start)
