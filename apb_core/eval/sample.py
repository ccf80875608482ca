"""What every synthetic task builds on: the `Sample` it returns, its random streams, and the sizing.

Sizing. A sample's size is measured as the prompt an engine would build from it:
    tokens(document + "\\n\\n" + question) + tokens(answer_prefix) + CHAT_TEMPLATE_ALLOWANCE
with tokens(text) = len(tokenizer(text).input_ids). Each task renders its document from a number of haystack
units n (noise sentences, essay words, distractor needles, list entries, JSON pairs); `sized_sample` searches
the largest n whose document fits (an estimate from a probe, a doubling bracket, then bisection), and a final
check on the joined text steps n down if the separate counts were off by a token. The result is at most
`target_tokens` and, for the unit sizes used here, within ~3 % under it (one 50-token JSON pair is coarser
than that at 1K tokens).
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

CHAT_TEMPLATE_ALLOWANCE = 48  # tokens a chat template adds around one user turn (system prompt, role markers)
QUESTION_SEPARATOR = "\n\n"  # between the document and the question in the user turn
_MAX_UNITS = 10_000_000


@dataclass
class Question:
    """One of several questions about a sample's document (`apb eval --split-questions`), scored on its own."""

    question: str
    answers: list[str]
    answer_prefix: str = ""


@dataclass
class Sample:
    """One generated task instance.

    The engine asks `question` about `document` (the user turn is `user_message`), optionally starting the
    assistant turn with `answer_prefix`, generates up to `max_new_tokens`, and `scoring.score(sample, text)`
    compares the generated text with `answers` using `metric`. `target_tokens` is what was asked for,
    `actual_tokens` the measured prompt size (see the module docstring); `depth` is where the first asked
    needle sits in the haystack (0 = start, 1 = end), None for tasks without one. `questions`: for documents
    that hold several keys (niah_multikey_1, niah_multiquery), one question per key, each with its own answers
    (`apb eval --split-questions` asks them together about the one document).
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
    questions: list[Question] = field(default_factory=list)
    haystack: str = ""  # what fills the document: noise, python3.x-docs (real prose), generated-essays, ...

    @property
    def user_message(self) -> str:
        """The user turn the sizing assumes: the document, a blank line, the question."""
        return self.document + QUESTION_SEPARATOR + self.question


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of token ids `tokenizer(text)` produces (special tokens included, as the tokenizer adds them)."""
    return len(tokenizer(text).input_ids)


def needle_depth(task: str, seed: int, index: int) -> float:
    """Relative depth in [0, 1) of the asked needle of sample `index`: uniform at random from its own stream, as
    RULER draws it. (A fixed schedule put the first two samples at 0.50 and 0.12, and 0.12 lies in host 0's
    block, which APB computes exactly: it hid the approximation.)"""
    return task_rng(task, seed, index, "depth").random()


# ---------------------------------------------------------------------------------------------------------
# Random draws


def task_rng(task: str, seed: int, index: int, stream: str = "") -> random.Random:
    """An independent random stream per (task, seed, index, purpose); stable across runs and platforms.

    Separate streams keep a sample's answers fixed while its filler grows with the target length.
    """
    digest = hashlib.sha256(f"{task}|{seed}|{index}|{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class Distinct:
    """A lazily extended sequence of distinct draws; item j is the same whatever is asked first.

    Filler needles and JSON pairs are drawn through this, so growing the document for a longer target never
    changes the items already drawn, and no filler repeats an answer (pass the answers as `exclude`).
    """

    def __init__(self, rng: random.Random, draw: Callable[[random.Random], Hashable], exclude: Sequence = ()):
        self._rng, self._draw = rng, draw
        self._seen = set(exclude)
        self.items: list = []

    def take(self, n: int) -> list:
        """The first n distinct draws (drawing more as needed); ValueError if the draw space runs dry."""
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


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID string from `rng` (uuid.uuid4 would not be reproducible)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


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


def sized_sample(task: str, tokenizer: Any, target_tokens: int, seed: int, index: int, *,
                 render: Callable[[int], str], question: str, answers: list[str], metric: str,
                 max_new_tokens: int, answer_prefix: str = "", depth: float | None = None,
                 haystack: str = "") -> Sample:
    """The `Sample` whose document is `render(n)` for the largest n that fits `target_tokens` next to the
    question, answer prefix and template allowance (see the module docstring); `render(n)` must grow with n.

    Raises ValueError when even render(0) does not fit.
    """
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
                  target_tokens=target_tokens, actual_tokens=actual, depth=depth, haystack=haystack)
