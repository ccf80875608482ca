"""The essay haystack: ~42 KB of essays about invented crafts and places, written for apb.

RULER pads its needle tasks with an essay corpus it downloads; apb needs the same kind of coherent prose
offline and under its own licence, so it generates it deterministically from a small grammar shipped as
`apb_core/data/eval_essays.json`:
- `topics`: one essay each; every topic fills the same slots ({place}, {craft}, {members}, ...);
- `moves`: per paragraph kind, the sentences a paragraph may use; a move is one sentence, or a list of
  sentences that only make sense together (a claim and its follow-up);
- `slots`: topic-independent fillers, one pick per essay (an elder is [name, pronoun]);
- `asides`: sentences that fit any topic, sprinkled between moves so the essays do not all read alike.
Any edit to that file changes every document generated on the essay haystack. Like RULER, callers cycle the
text when they need more than one pass.
"""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache
from importlib import resources
from typing import Any

ESSAY_GRAMMAR = "eval_essays.json"  # under apb_core/data/

# Paragraph plan of every essay: (kinds, fewest moves, most moves); "a|b" picks one of the kinds.
_PLAN = (("intro", 3, 4), ("origins", 3, 5), ("method", 4, 6), ("people", 3, 5), ("trade|hardship", 3, 4),
         ("modern", 3, 4), ("reflection", 2, 3))
# Drawn in this order after the elder; the order fixes which random draws fill which slot.
_SLOT_ORDER = ("apprentice", "quote", "century", "small", "num", "years", "duration", "short", "big",
               "season_word")


@lru_cache(maxsize=1)
def _grammar() -> dict[str, Any]:
    """The parsed grammar file (read once; it only matters when an essay-haystack task is generated)."""
    return json.loads(resources.files("apb_core").joinpath("data", ESSAY_GRAMMAR).read_text(encoding="utf-8"))


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _essay(topic: dict[str, str], rng: random.Random, grammar: dict[str, Any]) -> list[str]:
    """One essay as a list of paragraphs; the moves of each paragraph keep their written order."""
    fillers = grammar["slots"]
    elder, pron = rng.choice(fillers["elder"])
    slots = dict(topic, elder=elder, pron=pron)
    for slot in _SLOT_ORDER:
        slots[slot] = rng.choice(fillers[slot])
    paragraphs = []
    for kinds, lo, hi in _PLAN:
        kind = rng.choice(kinds.split("|"))
        moves = grammar["moves"][kind]
        chosen = sorted(rng.sample(range(len(moves)), rng.randint(lo, min(hi, len(moves)))))
        sentences: list[str] = []
        for i in chosen:
            move = moves[i]
            sentences.extend([move] if isinstance(move, str) else move)
        if kind not in ("intro", "reflection") and rng.random() < 0.6:
            sentences.insert(rng.randint(1, len(sentences)), rng.choice(grammar["asides"]))
        paragraphs.append(" ".join(_capitalize(s.format(**slots)) for s in sentences))
    return paragraphs


@lru_cache(maxsize=1)
def essay_text() -> str:
    """The essay haystack: every topic's essay, paragraphs separated by blank lines (deterministic, ~42 KB)."""
    grammar = _grammar()
    paragraphs = []
    for i, topic in enumerate(grammar["topics"]):
        paragraphs.extend(_essay(topic, random.Random(1000 + i), grammar))
    return "\n\n".join(paragraphs)


@lru_cache(maxsize=1)
def essay_units() -> tuple[tuple[str, ...], tuple[bool, ...], tuple[bool, ...]]:
    """The essay split into words with their trailing whitespace, so that "".join(words) is the essay.

    Returns (words, sentence_start, paragraph_start): a needle may be inserted before word i when
    sentence_start[i]; paragraph_start[i] marks where a cycled haystack may begin. The last word carries a
    paragraph break so that the essay can be repeated end to end.
    """
    words = re.findall(r"\S+\s*", essay_text())
    words[-1] = words[-1].rstrip() + "\n\n"
    sentence_start = [True] + [re.search(r"[.!?]\"?\s+$", w) is not None for w in words[:-1]]
    paragraph_start = [True] + [w.endswith("\n\n") for w in words[:-1]]
    return tuple(words), tuple(sentence_start), tuple(paragraph_start)
