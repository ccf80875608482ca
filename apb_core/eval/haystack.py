"""Haystacks and word lists for the synthetic long-context tasks, all original to apb.

Three haystacks:
- `NOISE_SENTENCES`: a handful of plain sentences repeated without end (the "noise" haystack that RULER and
  InfiniteBench both use for retrieval tasks); `noise_haystack()`.
- real prose (`apb_core.eval.prose`: the Python documentation CPython ships), from a random paragraph, never
  repeated within a sample: what RULER's essay tasks read (`text_haystack` picks it whenever it is long enough).
- the generated essays of `apb_core.eval.essay` (`essay_text()`, `essay_units()`), cycled from a random
  paragraph; `essay_haystack(rng)`: the fallback when the prose is missing or shorter than the target.
A `Haystack` renders its first n units with needles placed at relative depths, so that the sizing code only
has to choose n.

Word lists, shipped as `apb_core/data/eval_words.txt`: `KEY_ADJECTIVES` x `KEY_NOUNS` make needle keys
("amber-lantern"); `COMMON_WORDS` feeds the common-words task and is filtered so that no word is a substring
of another (a prediction that names one word can never match another by accident).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from apb_core.eval.essay import essay_text, essay_units
from apb_core.eval.prose import PROSE_NAME, prose_text, prose_units

__all__ = ["COMMON_WORDS", "ESSAY_NAME", "KEY_ADJECTIVES", "KEY_NOUNS", "NOISE_SENTENCES", "PROSE_NAME", "Haystack",
           "essay_haystack", "essay_text", "essay_units", "noise_haystack", "prose_haystack", "read_word_lists",
           "text_haystack"]

ESSAY_NAME = "generated-essays"  # Sample.haystack of the fallback

WORD_LISTS = "eval_words.txt"  # under apb_core/data/

NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


def read_word_lists(name: str = WORD_LISTS) -> dict[str, list[str]]:
    """The word lists of a data file under apb_core/data/: {section: words in file order}.

    The file is plain text so that the lists stay easy to read and edit: a `[section]` line starts a list,
    the words follow separated by any whitespace, and lines starting with "#" are comments.
    """
    lists: dict[str, list[str]] = {}
    section: list[str] | None = None
    for line in resources.files("apb_core").joinpath("data", name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("[") and line.rstrip().endswith("]"):
            section = lists.setdefault(line.strip()[1:-1], [])
        elif line.strip():
            if section is None:
                raise ValueError(f"{name}: words before the first [section]")
            section.extend(line.split())
    return lists


_WORDS = read_word_lists()
KEY_ADJECTIVES: tuple[str, ...] = tuple(_WORDS["key_adjectives"])
KEY_NOUNS: tuple[str, ...] = tuple(_WORDS["key_nouns"])


def _no_substrings(words: list[str]) -> tuple[str, ...]:
    """Drop every word that occurs inside another word of the list (keeps the longer one), and duplicates."""
    unique = sorted(set(words))
    return tuple(w for w in unique if not any(w != other and w in other for other in unique))


COMMON_WORDS: tuple[str, ...] = _no_substrings(
    [w for w in _WORDS["common_words"] if len(w) >= 4]
    + [w for w in KEY_NOUNS if len(w) >= 4]
)


@dataclass
class Haystack:
    """An endless sequence of text units (unit j with its trailing whitespace) that needles can be put into.

    `can_insert(j)` says whether a needle may go right before unit j (the essay keeps sentences whole);
    `needle_sep` follows each inserted needle.
    """

    unit: Callable[[int], str]
    can_insert: Callable[[int], bool]
    needle_sep: str = " "

    def render(self, n: int, needles: Sequence[tuple[float, str]]) -> str:
        """The first n units with each (depth, text) needle at the allowed position nearest to depth * n."""
        units = [self.unit(j) for j in range(n)]
        slots = [j for j in range(n + 1) if j == 0 or self.can_insert(j)]
        placed = []
        for k, (depth, text) in enumerate(needles):
            target = depth * n
            i = bisect.bisect_left(slots, target)
            pos = min(slots[max(i - 1, 0):i + 1], key=lambda s: abs(s - target))
            placed.append((pos, k, text))
        for pos, _, text in sorted(placed, reverse=True):  # back to front; equal positions keep needle order
            units.insert(pos, text + self.needle_sep)
        return "".join(units).rstrip()


def noise_haystack() -> Haystack:
    """`NOISE_SENTENCES` repeated; a needle may go between any two sentences."""
    sentences = NOISE_SENTENCES
    return Haystack(unit=lambda j: sentences[j % len(sentences)] + " ", can_insert=lambda j: True)


def _cycled(units: tuple[list[str], list[bool], list[bool]], rng: random.Random) -> Haystack:
    """A corpus's words from a paragraph picked by `rng`, wrapping to the start after the end; needles go
    between sentences. units: (words, sentence starts, paragraph starts)."""
    words, sentence_start, paragraph_start = units
    offset = rng.choice([i for i, is_start in enumerate(paragraph_start) if is_start])
    size = len(words)
    return Haystack(unit=lambda j: words[(offset + j) % size],
                    can_insert=lambda j: sentence_start[(offset + j) % size])


def essay_haystack(rng: random.Random) -> Haystack:
    """The essay corpus, cycled, starting at a paragraph picked by `rng`; needles go between sentences."""
    return _cycled(essay_units(), rng)


def prose_haystack(rng: random.Random) -> Haystack:
    """The real prose from a paragraph picked by `rng`, wrapping to the start after the end (so nothing repeats
    before the haystack is longer than the corpus); needles go between sentences."""
    return _cycled(prose_units(), rng)


_PROSE_TOKENS: dict[int, tuple[Any, int]] = {}  # id(tokenizer) -> (tokenizer, corpus tokens): one count per run


def prose_tokens(tokenizer: Any) -> int:
    """Tokens of the whole prose corpus under `tokenizer` (0 where the corpus is missing)."""
    key = id(tokenizer)
    if key not in _PROSE_TOKENS:
        text = prose_text()
        _PROSE_TOKENS[key] = (tokenizer, len(tokenizer(text).input_ids) if text else 0)
    return _PROSE_TOKENS[key][1]


def text_haystack(rng: random.Random, tokenizer: Any, target_tokens: int) -> tuple[Haystack, str]:
    """(haystack, its name) for RULER's essay tasks: the real prose when its corpus has at least
    `target_tokens` tokens (then no sentence repeats in the sample), else the generated essays, cycled."""
    if prose_tokens(tokenizer) >= target_tokens:
        return prose_haystack(rng), PROSE_NAME
    return essay_haystack(rng), ESSAY_NAME
