"""95% confidence intervals for `apb eval`'s summary: a paired, stratified percentile bootstrap in pure Python.

The quality claim ("APB's average accuracy >= full - 1 point at every (length, H)") is made on a handful of
samples per task, where one sample moves a task by 10 points or more; a point estimate alone cannot say
whether a -2.0 is a loss or noise. Each summary cell therefore carries an interval:

- accuracy_ci: resample the cell's samples with replacement (n draws of n) and take the mean score; the
  interval is the 2.5th..97.5th percentile of that mean over `rounds` resamples (2000 by default).
- delta_ci (the gap to full): *paired*. Every method is asked the very same prompts (the rows' `digest`), so
  each sample gives one difference, method score - full score on that sample, and the bootstrap resamples
  these differences. Pairing removes the between-sample variance (easy and hard samples move both methods
  together): when APB answers like full on all but one sample the interval is narrow, while two independently
  resampled accuracies would each swing by tens of points and their difference by more.
- averages over tasks (the unweighted mean of task accuracies): *stratified*. Each round resamples within
  every task (a task keeps its own number of samples) and recomputes the mean over tasks of the per-task
  means, the same statistic as the point estimate. Pooling all samples instead would let one task's draws
  stand in for another's and weight tasks by their luck in the draw.

What a "sample" is (see `sample_key`): rows name their document by (seed, index, digest), the digest being a
hash of the prompt the model read, and split-question rows (`apb eval --split-questions`) add `question`.
A document is the resampled unit, so the four questions asked of one document move together (they are not
four independent samples); pairs are matched by (document, question). full runs once and its rows are copied
to the other hosts values (`reused_from_hosts`) with the same ids, so pairing within (length, task, hosts)
finds them at every H. Rows with none of the ids (hand-written or very old files) pair by their order.

Limits: a percentile bootstrap only sees the spread the samples show. When no sample differs from full the
delta interval is exactly [0, 0]; that says nothing differed, not that nothing could (with n pairs and no
difference seen, a difference rate up to about 3/n stays plausible). With ~10 samples per task the intervals
are themselves rough (the bootstrap is a bit narrow at small n); they bound the claims, not certify them.

Determinism: every interval draws from its own `random.Random(seed)`, the seed naming the cell (runner
passes f"{seed}|{length}|{task}|{method}|{hosts}|..."), and units are sorted by id, so the same rows give the
same interval whatever their order or whichever other cells are present.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ROUNDS = 2000  # bootstrap resamples: the 2.5th/97.5th percentiles rest on 50 draws each, and it stays fast
LEVEL = 0.95
TARGET_POINTS = 1.0  # the target: average accuracy >= full - 1 point
_EPS = 1e-9  # float slack when an interval bound sits exactly on the target

Unit = list[float]  # the values of one resampled unit: a document's scores, or its paired differences
DocId = tuple[Any, ...]


def sample_key(row: Mapping[str, Any], ordinal: int) -> tuple[DocId, Any]:
    """(document id, question id) of a row. The document id is (seed, index, digest), i.e. which prompt was
    asked; rows that carry none of them fall back to their position in the cell (`ordinal`)."""
    doc = (row.get("seed"), row.get("index"), row.get("digest"))
    if doc == (None, None, None):
        doc = ("#", ordinal)
    return doc, row.get("question")


def _by_sample(rows: Iterable[Mapping[str, Any]]) -> dict[DocId, dict[Any, list[float]]]:
    """document -> question -> scores (a list: a merged file may hold the same sample twice)."""
    out: dict[DocId, dict[Any, list[float]]] = {}
    for ordinal, row in enumerate(rows):
        doc, question = sample_key(row, ordinal)
        out.setdefault(doc, {}).setdefault(question, []).append(float(row["score"]))
    return out


def _sorted_docs(docs: Iterable[DocId]) -> list[DocId]:
    """A fixed unit order, so the resampling does not depend on the order the rows came in."""
    return sorted(docs, key=repr)


def score_units(rows: Iterable[Mapping[str, Any]]) -> list[Unit]:
    """One unit per document: the scores of all its rows (one row unless questions were split)."""
    grouped = _by_sample(rows)
    return [[s for scores in grouped[doc].values() for s in scores] for doc in _sorted_docs(grouped)]


def paired_units(rows: Iterable[Mapping[str, Any]], full_rows: Iterable[Mapping[str, Any]]) -> list[Unit]:
    """One unit per document both were asked: per question, the method's score minus full's (each averaged
    over duplicates). Samples only one side has are left out: they have no partner to difference with."""
    mine, full = _by_sample(rows), _by_sample(full_rows)
    units = []
    for doc in _sorted_docs(mine.keys() & full.keys()):
        diffs = [math.fsum(s) / len(s) - math.fsum(full[doc][q]) / len(full[doc][q])
                 for q, s in mine[doc].items() if q in full[doc]]
        if diffs:
            units.append(diffs)
    return units


def stratified_mean(strata: Sequence[Sequence[Unit]]) -> float:
    """The statistic, in points: the unweighted mean over strata (tasks) of each stratum's mean value x 100.
    One stratum: the plain mean over its values, x 100."""
    return _mean_of_means([[(math.fsum(u), len(u)) for u in units] for units in strata])


def _mean_of_means(strata: Sequence[Sequence[tuple[float, int]]]) -> float:
    """Mean over strata of 100 x sum(values) / count(values), from each unit's (sum, count): the order of
    operations of the runner's point estimates (task accuracy in points, then the mean over tasks), so a
    degenerate interval equals its point estimate to the last bit in the usual cases."""
    means = [100 * math.fsum(s for s, _ in units) / sum(n for _, n in units) for units in strata]
    return math.fsum(means) / len(means)


def bootstrap_ci(strata: Sequence[Sequence[Unit]], seed: int | str = 0, rounds: int = ROUNDS,
                 level: float = LEVEL) -> list[float] | None:
    """Percentile interval [lo, hi] of `stratified_mean` (in points), resampling units within each
    stratum; None when a stratum is empty (nothing to resample, e.g. no sample paired with full)."""
    if not strata or any(not units for units in strata):
        return None
    rng = random.Random(seed)
    pooled = [[(math.fsum(u), len(u)) for u in units] for units in strata]
    stats = sorted(_mean_of_means([rng.choices(units, k=len(units)) for units in pooled]) for _ in range(rounds))
    tail = (1.0 - level) / 2
    return [_quantile(stats, tail), _quantile(stats, 1.0 - tail)]


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default): always between two drawn values, so
    the interval never leaves the range the statistic can take."""
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def target_verdict(delta_ci: Sequence[float] | None, tolerance: float = TARGET_POINTS) -> str | None:
    """Whether the interval of the average delta clears full - tolerance: "met" (its lower bound does: the
    target holds at 95%), "missed" (its upper bound does not: the target fails at 95%), or "unresolved" (the
    interval straddles it: more samples are needed to say). None without an interval."""
    if delta_ci is None:
        return None
    lo, hi = delta_ci
    if lo >= -tolerance - _EPS:
        return "met"
    if hi < -tolerance - _EPS:
        return "missed"
    return "unresolved"
