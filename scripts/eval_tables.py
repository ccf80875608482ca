"""Markdown accuracy tables from one or more `apb eval --out` JSONL files (for docs/quality.md).

Rows of apb with an ablation get the ablation in their method name (e.g. `apb[auto_exact=False]`), so runs
with and without an ablation can be merged and compared with the same `full` rows:

    python scripts/eval_tables.py /tmp/evalruns/a4k.jsonl /tmp/evalruns/c4k.jsonl

Rows of the same answer (length, task, seed, sample, method, hosts) read more than once, e.g. a task rerun after a
device call's time limit cut it (scripts/gpu_eval_jobs.py), count once: the last one read wins. `--min-full 20`
keeps the tasks where full scored above 20 at that length (the quality issue's rule) and `--merged FILE` writes
the rows that were counted. The last line pools every method's paired differences to full over all its
(length, H, task) strata (stratified bootstrap, apb_core.eval.stats).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apb_core.eval import stats  # noqa: E402
from apb_core.eval.runner import read_rows, summarise  # noqa: E402


def _label(row: dict) -> str:
    ablation = row.get("ablation") or {}
    if row["method"] != "apb" or not ablation:
        return row["method"]
    return "apb[" + ",".join(f"{k}={v}" for k, v in sorted(ablation.items())) + "]"


def _fmt(cell, method: str, bold: bool = False) -> str:
    """accuracy, with the gap to full for other methods; '-' where the cell did not run."""
    if cell is None:
        return "-"
    text = f"{cell.accuracy:.1f}"
    if method != "full" and cell.delta_vs_full is not None:
        text += f" ({cell.delta_vs_full:+.1f})"
    return f"**{text}**" if bold else text


def _answer_key(row: dict) -> tuple:
    return (row["length"], row["task"], row.get("seed"), row["index"], row.get("question"), _label(row),
            row["hosts"])


def _ci(cell, field: str) -> str:
    ci = getattr(cell, field, None) if cell is not None else None
    return "" if ci is None else f"{ci[0]:+.1f}..{ci[1]:+.1f}"


def main(argv: list[str]) -> None:
    min_full, merged, paths = None, None, []
    args = iter(argv)
    for arg in args:
        if arg == "--min-full":
            min_full = float(next(args))
        elif arg == "--merged":
            merged = next(args)
        else:
            paths.append(arg)
    unique = {_answer_key(row): row for path in paths for row in read_rows(path)}
    raw = list(unique.values())
    # full is exact at any number of hosts (the eval reuses one full answer for every H): give each other H its copy
    hosts_of = defaultdict(set)
    for r in raw:
        hosts_of[r["length"]].add(r["hosts"])
    have = {_answer_key(r) for r in raw}
    for r in [r for r in raw if r["method"] == "full"]:
        for h in sorted(hosts_of[r["length"]]):
            copy = dict(r, hosts=h, reused_from_hosts=r.get("reused_from_hosts") or r["hosts"])
            if _answer_key(copy) not in have:
                have.add(_answer_key(copy))
                raw.append(copy)
    if min_full is not None:
        full_cells, _ = summarise([r for r in raw if r["method"] == "full"])
        keep = {(c.length, c.task) for c in full_cells if c.accuracy > min_full}
        dropped = sorted({(r["length"], r["task"]) for r in raw} - keep)
        if dropped:
            print("tasks left out (full at or below " + f"{min_full:g}): " + ", ".join(f"{t}@{n}" for n, t in dropped))
        raw = [r for r in raw if (r["length"], r["task"]) in keep]
    if merged is not None:
        Path(merged).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in raw))
    rows = [dict(row, method=_label(row)) for row in raw]
    cells, averages = summarise(rows)
    columns = sorted({(c.method, c.hosts) for c in cells}, key=lambda mh: (mh[0] != "full", mh[1], mh[0]))
    columns = [mh for mh in columns if mh[0] != "full" or mh[1] == min(h for m, h in columns if m == "full")]
    for length in sorted({c.length for c in cells}):
        by_key = {(c.task, c.method, c.hosts): c for c in cells if c.length == length}
        avg = {(c.method, c.hosts): c for c in averages if c.length == length}
        tasks = sorted({c.task for c in cells if c.length == length})
        head = ["task", "n"] + [("full (any H)" if m == "full" else f"{m} H={h}") for m, h in columns]
        print(f"\n#### {length} tokens\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * 2 + "---:|" * len(columns))
        for task in tasks:
            n = max(c.samples for (t, _, _), c in by_key.items() if t == task)
            cells_txt = [_fmt(by_key.get((task, m, h)), m) for m, h in columns]
            print(f"| {task} | {n} | " + " | ".join(cells_txt) + " |")
        avg_txt = [_fmt(avg.get((m, h)), m, bold=True) for m, h in columns]
        total = sum(c.samples for c in averages if c.length == length and (c.method, c.hosts) == columns[0])
        print(f"| **average** | {total} | " + " | ".join(avg_txt) + " |")
        print("| Δ 95% CI | | " + " | ".join(_ci(avg.get(mh), "delta_ci") for mh in columns) + " |")
        print("| target ≥ −1 | | " + " | ".join((avg[mh].target or "") if mh in avg else "" for mh in columns) + " |")
        print("| answers | | " + " | ".join(str(avg[mh].samples) if mh in avg else "" for mh in columns) + " |")
        hits: dict[tuple[str, int], list[float]] = defaultdict(list)  # cite_hit of the correct answers
        for row in rows:
            if row["length"] == length and row["correct"] and row.get("cite_hit") is not None:
                hits[(row["method"], row["hosts"])].append(row["cite_hit"])
        if hits:
            cited = [f"{100 * sum(v) / len(v):.1f} ({sum(v):g}/{len(v)})" if (v := hits.get(mh)) else ""
                     for mh in columns]
            print("| cite_hit (correct needle answers) | | " + " | ".join(cited) + " |")
        prefill: dict[tuple[str, int], list[float]] = defaultdict(list)
        for row in rows:
            if row["length"] == length and row.get("reused_from_hosts") is None:
                prefill[(row["method"], row["hosts"])].append(row["timings"]["prefill_s"])
        spans = [f"{m} H={h} {statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})"
                 for (m, h), v in sorted(prefill.items())]
        print("\nprefill s, median (min–max): " + "; ".join(spans))
        layouts = sorted({(r["method"], r["hosts"], r["anchor_len"], str(r["passing_len"]), r.get("auto_exact"))
                          for r in rows if r["length"] == length and r["method"].startswith("apb")})
        print("\napb layouts (method, H, anchor, passing, auto_exact): " + "; ".join(map(str, layouts)))
    print("\n" + pooled(rows))


def pooled(rows: list[dict]) -> str:
    """Each non-full method's Δ vs full pooled over every (length, hosts, task) it ran: the mean of the task
    deltas and its 95% stratified, paired bootstrap interval."""
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_key[(row["length"], row["hosts"], row["task"], row["method"])].append(row)
    parts = []
    for method in sorted({k[3] for k in by_key if k[3] != "full"}):
        strata = [stats.paired_units(group, by_key[(n, h, t, "full")])
                  for (n, h, t, m), group in sorted(by_key.items()) if m == method and (n, h, t, "full") in by_key]
        if strata:
            lo, hi = stats.bootstrap_ci(strata, f"pooled|{method}", stats.ROUNDS)
            parts.append(f"{method} {stats.stratified_mean(strata):+.1f} [{lo:+.1f}, {hi:+.1f}] ({len(strata)} strata)")
    return "pooled Δ vs full over every (length, H, task): " + "; ".join(parts)


if __name__ == "__main__":
    main(sys.argv[1:])
