"""`apb eval`'s confidence intervals (apb_core/eval/stats.py) and how summarise() and the table carry them.

No model: rows are written by hand in the runner's shape. Where the bootstrap has only one possible value
(identical scores, constant differences) the tests check exact floats; elsewhere they check the properties
an interval must have (inside the statistic's range, around the point estimate, narrower when paired).
"""

from __future__ import annotations

import json
import random
from typing import Any

from rich.console import Console

from apb_cli.eval import accuracy_tables, format_cell, format_interval, interval_rows
from apb_core.eval import stats
from apb_core.eval.runner import Cell, EvalSummary, summarise

FULL = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]  # high between-sample spread: what pairing must cancel


def row(task: str, method: str, index: int, score: float, hosts: int = 2, length: int = 4096,
        reused_from: int | None = None, **extra: Any) -> dict[str, Any]:
    """A row as runner._row writes it, reduced to the fields summarise reads (plus the ids)."""
    return {"length": length, "task": task, "index": index, "seed": 0, "digest": f"{task}-{index:04d}",
            "method": method, "hosts": hosts, "reused_from_hosts": reused_from, "score": float(score),
            "correct": score >= 1.0, **extra}


def rows_for(task: str, method: str, scores: list[float], **kw: Any) -> list[dict[str, Any]]:
    return [row(task, method, i, s, **kw) for i, s in enumerate(scores)]


def cells_of(rows: list[dict[str, Any]]) -> tuple[dict[tuple[str, str, int], Cell], dict[tuple[str, int], Cell]]:
    cells, averages = summarise(rows)
    return ({(c.task, c.method, c.hosts): c for c in cells}, {(a.method, a.hosts): a for a in averages})


def unpaired_ci(a: list[float], b: list[float], rounds: int = stats.ROUNDS, seed: int = 0) -> list[float]:
    """What ignoring the pairing gives: resample each method's samples independently, difference the means."""
    rng = random.Random(seed)
    diffs = sorted(100 * (sum(rng.choices(a, k=len(a))) / len(a) - sum(rng.choices(b, k=len(b))) / len(b))
                   for _ in range(rounds))
    return [diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds)]]


def test_identical_scores_give_a_zero_delta_interval_exactly() -> None:
    scores = [1, 0, 0.5, 1, 0, 1, 0.25, 0, 1, 1]
    cells, averages = cells_of(rows_for("vt", "full", scores) + rows_for("vt", "apb", scores))
    assert cells[("vt", "apb", 2)].delta_ci == [0.0, 0.0] and cells[("vt", "apb", 2)].paired == 10
    assert cells[("vt", "full", 2)].delta_ci == [0.0, 0.0]  # full against itself
    assert averages[("apb", 2)].delta_ci == [0.0, 0.0] and averages[("apb", 2)].target == "met"
    assert averages[("full", 2)].target is None  # the reference has no target


def test_all_ones_and_all_zeros_give_degenerate_accuracy_intervals() -> None:
    cells, averages = cells_of(rows_for("a", "full", [1] * 7) + rows_for("b", "full", [0] * 3))
    assert cells[("a", "full", 2)].accuracy_ci == [100.0, 100.0]
    assert cells[("b", "full", 2)].accuracy_ci == [0.0, 0.0]
    assert averages[("full", 2)].accuracy_ci == [50.0, 50.0]  # unweighted over tasks, not 70 (pooled)


def test_interval_of_a_tiny_dataset_holds_the_estimate_within_the_possible_range() -> None:
    scores = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    lo, hi = stats.bootstrap_ci([[[s] for s in scores]])  # type: ignore[misc]
    assert 0.0 <= lo < 70.0 < hi <= 100.0
    assert 30.0 <= hi - lo <= 70.0  # sd of a mean of 10 Bernoulli(0.7) is 14.5 points: ~57 wide
    # a delta lies in [-100, 100] and its interval around the paired mean difference
    apb = [1, 1, 0, 1, 0, 1, 1, 1, 0, 1]
    cell = cells_of(rows_for("t", "full", scores) + rows_for("t", "apb", apb))[0][("t", "apb", 2)]
    assert cell.delta_ci is not None and cell.delta_vs_full == 0.0
    assert -100.0 <= cell.delta_ci[0] < 0.0 < cell.delta_ci[1] <= 100.0


def test_same_input_same_interval_whatever_the_row_order() -> None:
    rows = (rows_for("a", "full", FULL) + rows_for("a", "apb", [1, 1, 0, 0, 0, 1, 1, 1, 0, 1])
            + rows_for("b", "full", [1, 1, 1, 0]) + rows_for("b", "apb", [1, 0, 1, 0]))
    first = summarise(rows)
    assert summarise(rows) == first
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    again = summarise(shuffled)
    key = lambda c: (c.task, c.method, c.hosts)  # noqa: E731
    assert sorted(again[0], key=key) == sorted(first[0], key=key)
    assert sorted(again[1], key=key) == sorted(first[1], key=key)
    assert summarise(rows, seed=1) != first  # the seed is what fixes the draws


def test_pairing_narrows_the_delta_interval() -> None:
    apb = FULL[:]
    apb[0] = 1  # apb agrees with full on 9 of 10 samples and gains one
    cell = cells_of(rows_for("t", "full", FULL) + rows_for("t", "apb", apb))[0][("t", "apb", 2)]
    assert cell.delta_vs_full == 10.0 and cell.delta_ci is not None
    lo, hi = cell.delta_ci
    assert lo == 0.0 and 10.0 < hi <= 30.0  # paired: 0 or +1 per sample, one +1 among ten
    u_lo, u_hi = unpaired_ci(apb, FULL)
    assert u_lo < -20.0 and u_hi > 40.0 and u_hi - u_lo > 2 * (hi - lo)  # unpaired: the samples' spread


def test_pairs_are_matched_by_sample_not_by_row_order() -> None:
    apb = rows_for("t", "apb", FULL)[::-1]  # same answers as full, written in the opposite order
    cell = cells_of(rows_for("t", "full", FULL) + apb)[0][("t", "apb", 2)]
    assert cell.delta_ci == [0.0, 0.0] and cell.paired == 10
    # a sample full never ran has no partner: it counts in the accuracy, not in the paired delta
    cell = cells_of(rows_for("t", "full", FULL[:8]) + rows_for("t", "apb", FULL))[0][("t", "apb", 2)]
    assert cell.samples == 10 and cell.paired == 8 and cell.delta_ci == [0.0, 0.0]


def test_average_is_stratified_by_task() -> None:
    # task a: apb = full on 2 samples; task b: apb misses all 6 that full gets. Every stratified resample gives
    # mean(0, -100) = -50; pooling the 8 samples would give -75 on average and vary from draw to draw.
    rows = (rows_for("a", "full", [1, 0]) + rows_for("a", "apb", [1, 0])
            + rows_for("b", "full", [1] * 6) + rows_for("b", "apb", [0] * 6))
    average = cells_of(rows)[1][("apb", 2)]
    assert average.delta_vs_full == -50.0 and average.delta_ci == [-50.0, -50.0]
    assert average.target == "missed" and average.paired == 8


def test_runner_shaped_rows_with_reused_full_and_split_questions() -> None:
    rows = []
    for i, (f, a) in enumerate([(1, 1), (1, 0), (0, 0), (1, 1), (0, 1), (1, 1)]):
        full = row("niah_single_1", "full", i, f)
        rows += [full, dict(full, hosts=4, reused_from_hosts=2)]  # run_eval's copy for the other H
        rows += [row("niah_single_1", "apb", i, a), row("niah_single_1", "apb", i, a, hosts=4)]
    for doc in range(2):  # --split-questions: 4 questions of one document are one resampled unit
        for q in range(4):
            rows.append(row("niah_multikey_1", "full", doc, 1, question=q))
            rows.append(row("niah_multikey_1", "apb+shared", doc, q % 2, question=q))
    cells, averages = cells_of(rows)
    for hosts in (2, 4):
        cell = cells[("niah_single_1", "apb", hosts)]
        assert cell.paired == 6 and cell.delta_ci is not None and cell.accuracy_ci is not None
        assert cell.delta_ci[0] <= cell.delta_vs_full == 0.0 <= cell.delta_ci[1]
        assert cells[("niah_single_1", "full", hosts)].delta_ci == [0.0, 0.0]
    assert cells[("niah_single_1", "full", 4)].reused_full
    shared = cells[("niah_multikey_1", "apb+shared", 2)]
    assert shared.samples == shared.paired == 8 and shared.delta_ci == [-50.0, -50.0]  # each doc: 2 of 4 lost
    units = stats.paired_units([r for r in rows if r["method"] == "apb+shared"],
                               [r for r in rows if r["task"] == "niah_multikey_1" and r["method"] == "full"])
    assert units == [[-1.0, 0.0, -1.0, 0.0]] * 2
    average = averages[("apb", 2)]
    assert average.delta_ci is not None and average.target in {"met", "unresolved", "missed"}
    summary = EvalSummary(config={}, cells=list(cells.values()), averages=list(averages.values()), notes=[],
                          rows=len(rows), wall_s=0.0)
    dumped = json.loads(json.dumps(summary.to_dict(), allow_nan=False))
    assert {"accuracy_ci", "delta_ci", "paired", "target"} <= set(dumped["averages"][0])


def test_rows_without_ids_or_new_fields_still_summarise() -> None:
    def old(task: str, method: str, score: float) -> dict[str, Any]:  # test_eval_run's hand-written rows
        return {"length": 4096, "task": task, "method": method, "hosts": 2, "score": score, "reused_from_hosts": None}

    rows = [old("a", "full", 1.0), old("a", "full", 0.5), old("a", "apb", 1.0), old("a", "apb", 0.0),
            old("b", "full", 0.0), old("b", "apb", 1.0)]
    cells, averages = cells_of(rows)
    assert (cells[("a", "apb", 2)].accuracy, cells[("a", "apb", 2)].delta_vs_full) == (50.0, -25.0)
    assert cells[("b", "apb", 2)].delta_ci == [100.0, 100.0]  # paired by position, one pair
    assert averages[("apb", 2)].delta_vs_full == 37.5 and averages[("apb", 2)].paired == 3
    # without full there is nothing to pair with: no delta interval, no verdict
    cells, averages = cells_of([old("a", "apb", 1.0)])
    assert cells[("a", "apb", 2)].delta_ci is None and averages[("apb", 2)].target is None
    assert averages[("apb", 2)].accuracy_ci == [100.0, 100.0]


def test_target_verdict_and_quantiles() -> None:
    assert stats.target_verdict([-1.0, 3.0]) == "met"
    assert stats.target_verdict([-3.0, -1.5]) == "missed"
    assert stats.target_verdict([-3.0, -1.0]) == "unresolved"
    assert stats.target_verdict(None) is None
    assert stats._quantile([0.0, 10.0, 20.0], 0.25) == 5.0 and stats._quantile([4.0], 0.975) == 4.0
    assert stats.bootstrap_ci([]) is None and stats.bootstrap_ci([[[1.0]], []]) is None


def test_table_shows_the_average_intervals_and_old_summaries_render() -> None:
    rows = rows_for("a", "full", FULL) + rows_for("a", "apb", FULL[::-1])
    cells, averages = summarise(rows)
    summary = EvalSummary(config={"lengths": [4096], "samples": 10, "tasks": ["a"], "methods": ["full", "apb"],
                                  "hosts": [2]}, cells=cells, averages=averages, notes=[], rows=20, wall_s=0.0)
    console = Console(width=160, record=True)
    for table in accuracy_tables(summary.to_dict()):
        console.print(table)
    text = console.export_text()
    assert "acc 95% CI" in text and "delta 95% CI" in text and "target >= -1" in text
    assert format_interval([-8.333, 0.0], signed=True) == "-8.3..+0.0" and format_interval(None) == "-"
    assert interval_rows([None], ["apb"]) == [("acc 95% CI", ["-"]), ("delta 95% CI", ["-"]),
                                              ("target >= -1", ["-"])]
    old = summary.to_dict()
    for c in old["cells"] + old["averages"]:  # a summary written before the intervals existed
        for name in ("accuracy_ci", "delta_ci", "paired", "target"):
            del c[name]
    console = Console(width=160, record=True)
    for table in accuracy_tables(old):
        console.print(table)
    assert "95% CI" not in console.export_text()
    assert format_cell(old["averages"][0], "full") == "50.0"
