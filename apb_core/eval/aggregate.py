"""RULER's aggregation tasks: answers spread over the whole document instead of sitting in one needle.

    vt   variable tracking: a 5-variable assignment chain in noise; name every variable
    cwe  common words: numbered word list, top-10 most repeated words
    fwe  frequent words: Zipf(2)-distributed coded words; the most frequent is replaced by dots ("....", noise
         the question says to ignore) and the answers are ranks 2-4, as RULER does (rank 1 alone would be a
         third of the credit for the word that fills most of the text)
vt and cwe open with one solved example (a short instance of the same task and its answer, with its own names
or words), RULER's one in-context example. max_new_tokens are RULER's budgets (vt 30, cwe 120, fwe 50).
"""

from __future__ import annotations

import math
import random
import string
from itertools import pairwise
from typing import Any

from apb_core.eval import haystack
from apb_core.eval.sample import Distinct, Sample, sized_sample, task_rng

_VT_INTRO = "Keep track of the chain of variable assignments hidden in the text below."
_VT_QUESTION = ("Find every variable that is assigned the value {value} in the text above, directly or through "
                "other variables.")
_VT_PREFIX = ("Following the chain of assignments in the text above, the {count} variables assigned the value "
              "{value} are:")


VT_EXAMPLE_UNITS = 40  # noise sentences of the solved example


def vt(tokenizer: Any, target_tokens: int, seed: int, index: int, *, hops: int = 4) -> Sample:
    """Variable tracking: VAR A = 12345, then VAR B = VAR A, ... (`hops` links) spread through noise text,
    after one solved example with its own names and value."""
    task = "vt"
    rng = task_rng(task, seed, index)
    value = str(rng.randrange(10_000, 100_000))
    plain = " ".join((_VT_INTRO, _VT_QUESTION, _VT_PREFIX, *haystack.NOISE_SENTENCES)).casefold()

    def draw_name(r: random.Random) -> str:
        while True:  # a name that also reads as a word of the prompt would leak into the question
            name = "".join(r.choice(string.ascii_uppercase) for _ in range(5))
            if name.casefold() not in plain:
                return name

    names = Distinct(rng, draw_name).take(hops + 1)
    depths = sorted(rng.random() for _ in names)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
    needles = list(zip(depths, chain, strict=True))
    hay = haystack.noise_haystack()
    ex_rng = task_rng(task, seed, index, "example")
    ex_value = str(ex_rng.randrange(10_000, 100_000))
    while ex_value == value:
        ex_value = str(ex_rng.randrange(10_000, 100_000))
    ex_names = Distinct(ex_rng, draw_name, exclude=names).take(hops + 1)
    ex_chain = [f"VAR {ex_names[0]} = {ex_value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(ex_names)]
    ex_needles = list(zip(sorted(ex_rng.random() for _ in ex_names), ex_chain, strict=True))
    example = (_VT_INTRO + "\n\n" + hay.render(VT_EXAMPLE_UNITS, ex_needles) + "\n\n"
               + _VT_QUESTION.format(value=ex_value) + " " + _VT_PREFIX.format(count=len(ex_names), value=ex_value)
               + " " + " ".join(ex_names) + ".\n\n")
    return sized_sample(task, tokenizer, target_tokens, seed, index,
                        render=lambda n: example + _VT_INTRO + "\n\n" + hay.render(n, needles),
                        question=_VT_QUESTION.format(value=value), answers=names, metric="string_match_all",
                        max_new_tokens=30, answer_prefix=_VT_PREFIX.format(count=len(names), value=value),
                        depth=depths[0], haystack="noise")


def cwe_counts(n: int, pool_size: int) -> tuple[int, int, int]:
    """Common-words frequencies for n uncommon entries: (distinct uncommon words, max uncommon count,
    count of each common word).

    RULER repeats 10 common words 30 times and the others 3 times. We keep 3 while the word list lasts, cap
    the common count at n / 20 so short contexts are not all common words, and past the list's end let both
    grow together (common = 10 x the mean uncommon count), always at least 2 above any uncommon word.
    """
    distinct = min(pool_size, math.ceil(n / 3))
    top = math.ceil(n / distinct) if distinct else 0
    ten_mean = math.ceil(10 * n / distinct) if distinct else 0
    return distinct, top, max(top + 2, min(math.ceil(n / 20), ten_mean))


CWE_EXAMPLE_WORDS = 30  # the solved example: 10 common words 3 times each, 20 others once
_CWE_INTRO = ("Below is a numbered list of words. Some words appear in it much more often than the others; notice "
              "which ones.")
_CWE_QUESTION = "What are the {common} most common words in the list above?"
_CWE_PREFIX = "The {common} words that appear most often in the list above are:"


def cwe(tokenizer: Any, target_tokens: int, seed: int, index: int, *, common: int = 10) -> Sample:
    """Common words: a numbered list where `common` words repeat more often than the rest; name them."""
    task = "cwe"
    rng = task_rng(task, seed, index)
    words = list(haystack.COMMON_WORDS)
    rng.shuffle(words)
    # the solved example takes its words from the end of the shuffled list: none of them is in the task's list
    ex_words, words = words[-CWE_EXAMPLE_WORDS:], words[:-CWE_EXAMPLE_WORDS]
    top_words, pool = words[:common], words[common:]
    ex_entries = [w for w in ex_words[:common] for _ in range(3)] + ex_words[common:]
    task_rng(task, seed, index, "example").shuffle(ex_entries)
    example = (_CWE_INTRO + "\n\n" + "\n".join(f"{i}. {word}" for i, word in enumerate(ex_entries, 1))
               + "\n\n" + _CWE_QUESTION.format(common=common) + " " + _CWE_PREFIX.format(common=common) + " "
               + ", ".join(ex_words[:common]) + ".\n\n")

    def render(n: int) -> str:
        distinct, _, per_common = cwe_counts(n, len(pool))
        entries = [w for w in top_words for _ in range(per_common)]
        for i, word in enumerate(pool[:distinct]):
            entries.extend([word] * (n // distinct + (i < n % distinct)))
        task_rng(task, seed, index, f"order{n}").shuffle(entries)
        listing = "\n".join(f"{i}. {word}" for i, word in enumerate(entries, 1))
        return example + _CWE_INTRO + "\n\n" + listing

    return sized_sample(task, tokenizer, target_tokens, seed, index, render=render,
                        question=_CWE_QUESTION.format(common=common), answers=top_words,
                        metric="string_match_all", max_new_tokens=120,
                        answer_prefix=_CWE_PREFIX.format(common=common), haystack="word-list")


def fwe_counts(n: int, vocab: int = 100, alpha: float = 2.0) -> list[int]:
    """Occurrences of each of `vocab` coded words in a text of n words, word k getting ~ n / k**alpha / H.

    Quotas are rounded down and the remainder goes one by one to the rarest words, so the top words keep
    their strict Zipf order (checked: for n >= 120 the first four counts are strictly decreasing).
    """
    weights = [k ** -alpha for k in range(1, vocab + 1)]
    total = sum(weights)
    counts = [int(n * w / total) for w in weights]
    for i in range(n - sum(counts)):
        counts[vocab - 1 - i % (vocab - 4)] += 1
    return counts


FWE_NOISE = "...."  # what replaces the most frequent coded word (RULER: noise the question says to ignore)


def fwe(tokenizer: Any, target_tokens: int, seed: int, index: int, *, top: int = 3) -> Sample:
    """Frequent words: random six-letter coded words with Zipf(2) frequencies, the most frequent one replaced by
    dots; name the `top` most frequent coded words after it (ranks 2..top+1)."""
    task = "fwe"
    rng = task_rng(task, seed, index)
    coded = Distinct(rng, lambda r: "".join(r.choice(string.ascii_lowercase) for _ in range(6))).take(100)
    coded[0] = FWE_NOISE

    def render(n: int) -> str:
        n += 120  # the smallest text that still ranks the top words strictly
        words = [w for w, c in zip(coded, fwe_counts(n, len(coded)), strict=True) for _ in range(c)]
        task_rng(task, seed, index, f"order{n}").shuffle(words)
        return ("Read the coded text below and keep count of how often each coded word appears. You will be "
                "asked which coded words appear most often.\n\n" + " ".join(words))

    return sized_sample(task, tokenizer, target_tokens, seed, index, render=render,
                        question=(f"Without any explanation, and ignoring the dots '{FWE_NOISE}', what are the "
                                  f"three most frequently appearing coded words in the coded text above?"),
                        answers=coded[1:top + 1], metric="string_match_all", max_new_tokens=50,
                        answer_prefix="The three most frequent coded words in the coded text above are:",
                        haystack="coded-words")
