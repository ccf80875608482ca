"""Scorers for the synthetic tasks: RULER's string matching and InfiniteBench's retrieval rules.

Every scorer maps (prediction, expected answers) to a float in [0, 1]; `score(sample, prediction)` picks the one
named by `sample.metric`.
- string_match_all (RULER niah/vt/cwe/fwe): fraction of the references contained in the prediction,
  case-insensitive.
- string_match_part (RULER QA): 1 if any reference is contained in the prediction.
- passkey / number_string (InfiniteBench): 1 if the first run of digits in the prediction is the key; a model
  that hedges with a wrong number first is wrong.
- kv_retrieval (InfiniteBench): 1 if the value appears as a whole word of the prediction (split on spaces and
  punctuation, hyphens kept so a UUID stays one word).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apb_core.eval.sample import Sample


def _check_refs(refs: Sequence[str]) -> None:
    if isinstance(refs, str) or not refs:
        raise ValueError(f"expected a non-empty list of reference strings, got {refs!r}")


def string_match_all(pred: str, refs: Sequence[str]) -> float:
    """Fraction of `refs` that occur in `pred`, ignoring case (RULER's metric for niah, vt, cwe and fwe)."""
    _check_refs(refs)
    text = pred.casefold()
    return sum(ref.casefold() in text for ref in refs) / len(refs)


def string_match_part(pred: str, refs: Sequence[str]) -> float:
    """1.0 if any of `refs` occurs in `pred`, ignoring case, else 0.0 (RULER's metric for QA)."""
    _check_refs(refs)
    text = pred.casefold()
    return float(any(ref.casefold() in text for ref in refs))


def first_integer_match(pred: str, key: str) -> float:
    """1.0 if the first run of digits in `pred` equals the integer `key` (InfiniteBench passkey/number_string)."""
    found = re.search(r"\d+", pred)
    return float(found is not None and int(found.group()) == int(key))


def passkey_score(pred: str, key: str) -> float:
    """InfiniteBench Retrieve.PassKey: the first integer in the answer must be the pass key."""
    return first_integer_match(pred, key)


def number_string_score(pred: str, number: str) -> float:
    """InfiniteBench Retrieve.Number: the first integer in the answer must be the hidden digit sequence."""
    return first_integer_match(pred, number)


def kv_retrieval_score(pred: str, value: str) -> float:
    """1.0 if `value` is one of the words of `pred` (InfiniteBench Retrieve.KV), ignoring case.

    Words are split on anything but letters, digits and hyphens, so quotes, braces and sentence punctuation
    around a UUID do not matter while a truncated or extended UUID does not count.
    """
    words = re.split(r"[^0-9a-z\-]+", pred.casefold())
    return float(value.casefold() in words)


def cite_hit(citations: Sequence[Any], refs: Sequence[str]) -> float:
    """1.0 if the top citation's text holds one of `refs`, ignoring case, else 0.0 (also without citations).

    For the needle tasks an expected value occurs only in its needle, so this says that the passage cited first
    is the needle's (the `cite_hit` eval metric; with several needles, any of them).
    """
    _check_refs(refs)
    if not citations:
        return 0.0
    text = citations[0].text.casefold()
    return float(any(ref.casefold() in text for ref in refs))


def _first(fn: Callable[[str, str], float]) -> Callable[[str, Sequence[str]], float]:
    def scorer(pred: str, refs: Sequence[str]) -> float:
        _check_refs(refs)
        return fn(pred, refs[0])

    return scorer


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "passkey": _first(passkey_score),
    "number_string": _first(number_string_score),
    "kv_retrieval": _first(kv_retrieval_score),
}


def score(sample: Sample, prediction: str) -> float:
    """Score one model answer for `sample` with the metric it names; a float in [0, 1].

    The prediction is the generated text only; if the engine put `sample.answer_prefix` in the prompt, it is
    not part of the prediction (the prefix never contains an answer, so including it changes nothing).
    """
    try:
        scorer = METRICS[sample.metric]
    except KeyError:
        raise ValueError(f"unknown metric {sample.metric!r}; valid metrics: {', '.join(METRICS)}") from None
    return scorer(prediction, sample.answers)
