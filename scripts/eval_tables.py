"""Markdown accuracy tables from one or more `apb eval --out` JSONL files (for docs/quality.md).

Rows of apb with an ablation get the ablation in their method name (e.g. `apb[auto_exact=False]`), so runs
with and without an ablation can be merged and compared with the same `full` rows:

    python scripts/eval_tables.py /tmp/evalruns/a4k.jsonl /tmp/evalruns/c4k.jsonl
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def main(paths: list[str]) -> None:
    rows = [dict(row, method=_label(row)) for path in paths for row in read_rows(path)]
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


if __name__ == "__main__":
    main(sys.argv[1:])
