"""Synthetic long-context tasks in the style of RULER and InfiniteBench, sized with the model's tokenizer.

`generate(task, tokenizer, target_tokens, seed, index)` builds one `Sample`: a document (instructions, then a
haystack with needles), a question, the expected answers and the metric that scores them. Everything is
deterministic in (task, seed, index); the tokenizer only decides how much haystack fits.

Sizing. A sample's size is measured as the prompt an engine would build from it:
    tokens(document + "\\n\\n" + question) + tokens(answer_prefix) + CHAT_TEMPLATE_ALLOWANCE
with tokens(text) = len(tokenizer(text).input_ids). Each task renders its document from a number of haystack
units n (noise sentences, essay words, distractor needles, list entries, JSON pairs); `_fit` searches the
largest n whose document fits (an estimate from a probe, a doubling bracket, then bisection), and a final
check on the joined text steps n down if the separate counts were off by a token. The result is at most
`target_tokens` and, for the unit sizes used here, within ~3 % under it (one 50-token JSON pair is coarser
than that at 1K tokens).

Tasks (RULER 13 minus the two QA tasks, which need downloaded data; InfiniteBench's three synthetic ones):
    niah_single_1    noise haystack, word key -> 7-digit number
    niah_single_2    essay haystack, word key -> number
    niah_single_3    essay haystack, word key -> UUID
    niah_multikey_1  essay haystack, 4 keys (1 asked, 3 distractors) -> numbers
    niah_multikey_2  haystack made of distractor needles, word keys -> numbers
    niah_multikey_3  haystack made of distractor needles, UUID keys -> UUIDs
    niah_multivalue  essay haystack, one key with 4 values, all expected
    niah_multiquery  essay haystack, 4 keys asked at once
    vt               variable tracking: a 5-variable assignment chain in noise; name every variable
    cwe              common words: numbered word list, top-10 most repeated words
    fwe              frequent words: Zipf(2)-distributed coded words, top-3
    passkey          InfiniteBench Retrieve.PassKey: 5-digit key in repeated noise
    number_string    InfiniteBench Retrieve.Number: 10-digit number in repeated noise
    kv_retrieval     InfiniteBench Retrieve.KV: JSON object of UUID -> UUID, one key asked

max_new_tokens: RULER's budgets (vt 30, cwe 120, fwe 50, multi-value/multi-query niah 128) except the
one-answer niah tasks, which get 64 instead of 128 (the answer plus a restated question fits in ~45 tokens
even for a UUID, and on CPU every decode step counts); InfiniteBench's retrieval tasks get 16/24/64.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import string
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import Any

from apb_core.eval import haystack

CHAT_TEMPLATE_ALLOWANCE = 48  # tokens a chat template adds around one user turn (system prompt, role markers)
QUESTION_SEPARATOR = "\n\n"  # between the document and the question in the user turn
_GOLDEN = (math.sqrt(5) - 1) / 2
_MAX_UNITS = 10_000_000


@dataclass
class Sample:
    """One generated task instance.

    The engine asks `question` about `document` (the user turn is `user_message`), optionally starting the
    assistant turn with `answer_prefix`, generates up to `max_new_tokens`, and `scoring.score(sample, text)`
    compares the generated text with `answers` using `metric`. `target_tokens` is what was asked for,
    `actual_tokens` the measured prompt size (see the module docstring); `depth` is where the first asked
    needle sits in the haystack (0 = start, 1 = end), None for tasks without one.
    """

    task: str
    index: int
    seed: int
    document: str
    question: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    answer_prefix: str = ""
    target_tokens: int = 0
    actual_tokens: int = 0
    depth: float | None = None

    @property
    def user_message(self) -> str:
        """The user turn the sizing assumes: the document, a blank line, the question."""
        return self.document + QUESTION_SEPARATOR + self.question


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of token ids `tokenizer(text)` produces (special tokens included, as the tokenizer adds them)."""
    return len(tokenizer(text).input_ids)


def needle_depth(index: int) -> float:
    """Relative depth in [0, 1) of the asked needle for sample `index`: a golden-ratio sequence, so any run of
    consecutive indices covers the document evenly (0.5, 0.12, 0.74, 0.35, 0.97, ...)."""
    return (0.5 + index * _GOLDEN) % 1.0


def _rng(task: str, seed: int, index: int, stream: str = "") -> random.Random:
    """An independent random stream per (task, seed, index, purpose); stable across runs and platforms."""
    digest = hashlib.sha256(f"{task}|{seed}|{index}|{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class _Distinct:
    """A lazily extended sequence of distinct draws; item j is the same whatever is asked first."""

    def __init__(self, rng: random.Random, draw: Callable[[random.Random], Hashable], exclude: Sequence = ()):
        self._rng, self._draw = rng, draw
        self._seen = set(exclude)
        self.items: list = []

    def take(self, n: int) -> list:
        misses = 0
        while len(self.items) < n:
            item = self._draw(self._rng)
            if item in self._seen:
                misses += 1
                if misses > 1000:
                    raise ValueError(f"ran out of distinct keys after {len(self.items)}; ask for a shorter target")
                continue
            misses = 0
            self._seen.add(item)
            self.items.append(item)
        return self.items[:n]


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(haystack.KEY_ADJECTIVES)}-{rng.choice(haystack.KEY_NOUNS)}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _number7(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


# ---------------------------------------------------------------------------------------------------------
# Sizing


def _fit(render: Callable[[int], str], budget: int, count: Callable[[str], int], what: str) -> tuple[int, str]:
    """Largest n with count(render(n)) <= budget, and its text; count(render(n)) must grow with n."""
    texts: dict[int, str] = {}

    def fits(n: int) -> bool:
        texts[n] = render(n)
        return count(texts[n]) <= budget

    texts[0] = render(0)
    base = count(texts[0])
    if base > budget:
        raise ValueError(f"{what}: target too small, the fixed parts alone need {base - budget} more tokens")
    probe = 32
    rate = max((count(render(probe)) - base) / probe, 1e-3)  # tokens per unit
    guess = max(1, min(_MAX_UNITS, int((budget - base) / rate)))
    step = max(1, guess // 64)
    lo, hi = 0, None  # render(lo) fits, render(hi) does not
    if fits(guess):
        lo = guess
        while hi is None:
            if lo + step > _MAX_UNITS:
                raise ValueError(f"{what}: target too large")
            if fits(lo + step):
                lo, step = lo + step, step * 2
            else:
                hi = lo + step
    else:
        hi = guess
        while True:
            n = max(0, hi - step)
            if n == 0 or fits(n):
                lo = n
                break
            hi, step = n, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, texts[lo]


def _sized(task: str, tokenizer: Any, target_tokens: int, seed: int, index: int, *, render: Callable[[int], str],
           question: str, answers: list[str], metric: str, max_new_tokens: int, answer_prefix: str = "",
           depth: float | None = None) -> Sample:
    """Fit `render`'s document into `target_tokens` next to the question, prefix and template allowance."""
    count = partial(count_tokens, tokenizer)
    fixed = (count(QUESTION_SEPARATOR + question) + (count(answer_prefix) if answer_prefix else 0)
             + CHAT_TEMPLATE_ALLOWANCE)
    n, document = _fit(render, target_tokens - fixed, count, f"{task} at {target_tokens} tokens")

    def measure(doc: str) -> int:
        return (count(doc + QUESTION_SEPARATOR + question) + (count(answer_prefix) if answer_prefix else 0)
                + CHAT_TEMPLATE_ALLOWANCE)

    actual = measure(document)
    while actual > target_tokens and n > 0:  # joined text tokenized a token or two longer than its parts
        n -= 1
        document = render(n)
        actual = measure(document)
    if actual > target_tokens:
        raise ValueError(f"{task}: target_tokens={target_tokens} is too small (needs {actual})")
    return Sample(task=task, index=index, seed=seed, document=document, question=question, answers=answers,
                  metric=metric, max_new_tokens=max_new_tokens, answer_prefix=answer_prefix,
                  target_tokens=target_tokens, actual_tokens=actual, depth=depth)


# ---------------------------------------------------------------------------------------------------------
# Haystacks with needles


@dataclass
class _Haystack:
    unit: Callable[[int], str]  # unit j, with its trailing whitespace
    can_insert: Callable[[int], bool]  # may a needle go right before unit j
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


def _noise_haystack() -> _Haystack:
    sentences = haystack.NOISE_SENTENCES
    return _Haystack(unit=lambda j: sentences[j % len(sentences)] + " ", can_insert=lambda j: True)


def _essay_haystack(rng: random.Random) -> _Haystack:
    """The essay corpus, cycled, starting at a paragraph picked by `rng`; needles go between sentences."""
    words, sentence_start, paragraph_start = haystack.essay_units()
    starts = [i for i, is_start in enumerate(paragraph_start) if is_start]
    offset = rng.choice(starts)
    size = len(words)
    return _Haystack(unit=lambda j: words[(offset + j) % size],
                     can_insert=lambda j: sentence_start[(offset + j) % size])


# ---------------------------------------------------------------------------------------------------------
# RULER needle-in-a-haystack


@dataclass(frozen=True)
class _Niah:
    haystack: str  # "noise" | "essay" | "needles" (the haystack is distractor needles)
    key: str  # "word" | "uuid"
    value: str  # "number" | "uuid"
    keys: int = 1  # distinct keys with needles in the document; the first `queries` are asked
    values: int = 1  # values per key
    queries: int = 1
    max_new_tokens: int = 64


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind}s for {key} is: {value}."


def _niah(spec: _Niah, task: str, tokenizer: Any, target_tokens: int, seed: int, index: int) -> Sample:
    rng = _rng(task, seed, index)
    draw_key = _word_key if spec.key == "word" else _uuid
    draw_value = _number7 if spec.value == "number" else _uuid
    kind = "number" if spec.value == "number" else "uuid"
    keys = _Distinct(rng, draw_key).take(spec.keys)
    values = _Distinct(rng, draw_value).take(spec.keys * spec.values)
    pairs = [(key, values[i * spec.values + j]) for i, key in enumerate(keys) for j in range(spec.values)]
    asked = keys[:spec.queries]
    answers = [value for key, value in pairs if key in asked]
    depth = needle_depth(index)
    needles = [(depth if i == 0 else rng.random(), _needle(kind, key, value)) for i, (key, value) in enumerate(pairs)]

    if spec.haystack == "needles":
        fill_keys = _Distinct(_rng(task, seed, index, "fill-keys"), draw_key, exclude=keys)
        fill_values = _Distinct(_rng(task, seed, index, "fill-values"), draw_value, exclude=values)

        def distractor(j: int) -> str:
            fill_keys.take(j + 1)
            fill_values.take(j + 1)
            return _needle(kind, fill_keys.items[j], fill_values.items[j]) + "\n"

        hay = _Haystack(unit=distractor, can_insert=lambda j: True, needle_sep="\n")
    elif spec.haystack == "essay":
        hay = _essay_haystack(rng)
    else:
        hay = _noise_haystack()

    intro = (f"Some special magic {kind}s are hidden in the text below. Read it carefully and remember them; "
             f"you will be asked about them afterwards.")
    if len(answers) == 1:
        question = f"What is the special magic {kind} for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic {kind} for {asked[0]} mentioned in the provided text is"
    else:
        names = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
        question = f"What are all the special magic {kind}s for {names} mentioned in the provided text?"
        prefix = f"The special magic {kind}s for {names} mentioned in the provided text are"
    return _sized(task, tokenizer, target_tokens, seed, index,
                  render=lambda n: intro + "\n\n" + hay.render(n, needles), question=question, answers=answers,
                  metric="string_match_all", max_new_tokens=spec.max_new_tokens, answer_prefix=prefix,
                  depth=depth)


# ---------------------------------------------------------------------------------------------------------
# RULER variable tracking, common words, frequent words

_VT_INTRO = "Keep track of the chain of variable assignments hidden in the text below."
_VT_QUESTION = ("Find every variable that is assigned the value {value} in the text above, directly or through "
                "other variables.")
_VT_PREFIX = ("Following the chain of assignments in the text above, the {count} variables assigned the value "
              "{value} are:")


def vt(tokenizer: Any, target_tokens: int, seed: int, index: int, *, hops: int = 4) -> Sample:
    """Variable tracking: VAR A = 12345, then VAR B = VAR A, ... (`hops` links) spread through noise text."""
    task = "vt"
    rng = _rng(task, seed, index)
    value = str(rng.randrange(10_000, 100_000))
    plain = " ".join((_VT_INTRO, _VT_QUESTION, _VT_PREFIX, *haystack.NOISE_SENTENCES)).casefold()

    def draw_name(r: random.Random) -> str:
        while True:  # a name that also reads as a word of the prompt would leak into the question
            name = "".join(r.choice(string.ascii_uppercase) for _ in range(5))
            if name.casefold() not in plain:
                return name

    names = _Distinct(rng, draw_name).take(hops + 1)
    depths = sorted(rng.random() for _ in names)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
    needles = list(zip(depths, chain, strict=True))
    hay = _noise_haystack()
    return _sized(task, tokenizer, target_tokens, seed, index,
                  render=lambda n: _VT_INTRO + "\n\n" + hay.render(n, needles),
                  question=_VT_QUESTION.format(value=value), answers=names, metric="string_match_all",
                  max_new_tokens=30, answer_prefix=_VT_PREFIX.format(count=len(names), value=value),
                  depth=depths[0])


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


def cwe(tokenizer: Any, target_tokens: int, seed: int, index: int, *, common: int = 10) -> Sample:
    """Common words: a numbered list where `common` words repeat more often than the rest; name them."""
    task = "cwe"
    rng = _rng(task, seed, index)
    words = list(haystack.COMMON_WORDS)
    rng.shuffle(words)
    top_words, pool = words[:common], words[common:]

    def render(n: int) -> str:
        distinct, _, per_common = cwe_counts(n, len(pool))
        entries = [w for w in top_words for _ in range(per_common)]
        for i, word in enumerate(pool[:distinct]):
            entries.extend([word] * (n // distinct + (i < n % distinct)))
        _rng(task, seed, index, f"order{n}").shuffle(entries)
        listing = "\n".join(f"{i}. {word}" for i, word in enumerate(entries, 1))
        return ("Below is a numbered list of words. Some words appear in it much more often than the others; "
                "notice which ones.\n\n" + listing)

    return _sized(task, tokenizer, target_tokens, seed, index, render=render,
                  question=f"What are the {common} most common words in the list above?", answers=top_words,
                  metric="string_match_all", max_new_tokens=120,
                  answer_prefix=f"The {common} words that appear most often in the list above are:")


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


def fwe(tokenizer: Any, target_tokens: int, seed: int, index: int, *, top: int = 3) -> Sample:
    """Frequent words: random six-letter coded words with Zipf(2) frequencies; name the `top` most frequent."""
    task = "fwe"
    rng = _rng(task, seed, index)
    coded = _Distinct(rng, lambda r: "".join(r.choice(string.ascii_lowercase) for _ in range(6))).take(100)

    def render(n: int) -> str:
        n += 120  # the smallest text that still ranks the top words strictly
        words = [w for w, c in zip(coded, fwe_counts(n, len(coded)), strict=True) for _ in range(c)]
        _rng(task, seed, index, f"order{n}").shuffle(words)
        return ("Read the coded text below and keep count of how often each coded word appears. You will be "
                "asked which coded words appear most often.\n\n" + " ".join(words))

    return _sized(task, tokenizer, target_tokens, seed, index, render=render,
                  question=("Without any explanation, what are the three most frequently appearing coded words "
                            "in the coded text above?"),
                  answers=coded[:top], metric="string_match_all", max_new_tokens=50,
                  answer_prefix="The three most frequent coded words in the coded text above are:")


# ---------------------------------------------------------------------------------------------------------
# InfiniteBench retrieval

_IB_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
             "memorize it; you will be asked about it afterwards.")


def _noise_retrieval(task: str, tokenizer: Any, target_tokens: int, seed: int, index: int, *, secret: str,
                     needle: str, question: str, prefix: str, max_new_tokens: int) -> Sample:
    depth = needle_depth(index)
    hay = _noise_haystack()
    return _sized(task, tokenizer, target_tokens, seed, index,
                  render=lambda n: _IB_INTRO + "\n\n" + hay.render(n, [(depth, needle)]), question=question,
                  answers=[secret], metric=task, max_new_tokens=max_new_tokens, answer_prefix=prefix, depth=depth)


def passkey(tokenizer: Any, target_tokens: int, seed: int, index: int) -> Sample:
    """A 5-digit pass key hidden in repeated noise sentences; the first number of the answer must be it."""
    key = str(_rng("passkey", seed, index).randrange(10_000, 100_000))
    return _noise_retrieval("passkey", tokenizer, target_tokens, seed, index, secret=key,
                            needle=f"The pass key is {key}. Keep it in mind: {key} is the pass key.",
                            question="What is the pass key?", prefix="The pass key is", max_new_tokens=16)


def number_string(tokenizer: Any, target_tokens: int, seed: int, index: int) -> Sample:
    """A 10-digit number hidden in repeated noise sentences; the first number of the answer must be it."""
    number = str(_rng("number_string", seed, index).randrange(10**9, 10**10))
    return _noise_retrieval("number_string", tokenizer, target_tokens, seed, index, secret=number,
                            needle=f"The sequence of digits is {number}. Keep it in mind: {number} is the "
                                   f"sequence of digits.",
                            question="What is the sequence of digits?", prefix="The sequence of digits is",
                            max_new_tokens=24)


def kv_retrieval(tokenizer: Any, target_tokens: int, seed: int, index: int) -> Sample:
    """A JSON object of UUID keys to UUID values; the asked pair sits at `needle_depth(index)` of the object."""
    task = "kv_retrieval"
    rng = _rng(task, seed, index)
    key, value = _uuid(rng), _uuid(rng)
    fill_keys = _Distinct(_rng(task, seed, index, "fill-keys"), _uuid, exclude=[key])
    fill_values = _Distinct(_rng(task, seed, index, "fill-values"), _uuid, exclude=[value])
    depth = needle_depth(index)

    def render(n: int) -> str:
        pairs = list(zip(fill_keys.take(n), fill_values.take(n), strict=True))
        pairs.insert(round(depth * n), (key, value))
        return ("Extract the value that belongs to the requested key from the JSON object below.\n\n"
                "JSON data:\n" + json.dumps(dict(pairs)))

    return _sized(task, tokenizer, target_tokens, seed, index, render=render,
                  question=f'Key: "{key}"\nWhat is the value associated with this key in the JSON object above?',
                  answers=[value], metric="kv_retrieval", max_new_tokens=64,
                  answer_prefix="The value associated with the specified key is:", depth=depth)


# ---------------------------------------------------------------------------------------------------------
# Registry

Generator = Callable[[Any, int, int, int], Sample]  # (tokenizer, target_tokens, seed, index) -> Sample

_NIAH = {
    "niah_single_1": _Niah("noise", "word", "number"),
    "niah_single_2": _Niah("essay", "word", "number"),
    "niah_single_3": _Niah("essay", "word", "uuid"),
    "niah_multikey_1": _Niah("essay", "word", "number", keys=4),
    "niah_multikey_2": _Niah("needles", "word", "number"),
    "niah_multikey_3": _Niah("needles", "uuid", "uuid"),
    "niah_multivalue": _Niah("essay", "word", "number", values=4, max_new_tokens=128),
    "niah_multiquery": _Niah("essay", "word", "number", keys=4, queries=4, max_new_tokens=128),
}

TASKS: dict[str, Generator] = {
    **{name: partial(_niah, spec, name) for name, spec in _NIAH.items()},
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
    "passkey": passkey,
    "number_string": number_string,
    "kv_retrieval": kv_retrieval,
}
RULER_TASKS: tuple[str, ...] = (*_NIAH, "vt", "cwe", "fwe")
INFINITEBENCH_TASKS: tuple[str, ...] = ("passkey", "number_string", "kv_retrieval")


def generate(task: str, tokenizer: Any, target_tokens: int, seed: int, index: int) -> Sample:
    """Build sample `index` of `task` for `seed`, sized to at most `target_tokens` prompt tokens (see module doc).

    Raises ValueError for an unknown task (the message lists the valid ones) or a target too small to hold
    the task's fixed text.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if not isinstance(target_tokens, int) or target_tokens <= 0:
        raise ValueError(f"target_tokens must be a positive integer, got {target_tokens!r}")
    return TASKS[task](tokenizer, target_tokens, seed, index)

