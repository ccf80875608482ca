"""Compact summary of an `apb bench --json` file, with the speed targets of the GPU issue checked.

Targets at the longest length (128K on 2×H200): APB >= 2.5x one-GPU exact (`single`), >= 1.15x ring, >= 2x Star, and the
all-gather <= 2 % of APB's prefill (breakdown run). Ratios come from this one run only.
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows = data["rows"]
    print(f"machine: {data['machine']}")
    head = (f"{'len':>7} {'method':<9} {'gpus':>4} {'prefill s':>9} {'tok/s':>8} {'vs single':>9} {'vs ring':>7} "
            f"{'vs star':>7} {'eff TF/s':>8} {'busiest TF/s':>12} {'peak GiB':>8} {'dec ms':>7} {'logitsΔ':>8}")
    print(head)
    for r in rows:
        vs = r["speedup_vs"]
        peak = max([p for p in r["peak_mem_gib"] if p is not None], default=None)

        def f(x, n=2):
            return "-" if x is None else f"{x:.{n}f}"

        print(f"{r['len']:>7} {r['method']:<9} {r['hosts']:>4} {f(r['prefill_s'], 3):>9} {f(r['tokens_per_s'], 0):>8} "
              f"{f(vs.get('single')):>9} {f(vs.get('ring')):>7} {f(vs.get('star')):>7} "
              f"{f(r['effective_tflops'], 0):>8} {f(r['busiest_host_tflops'], 0):>12} {f(peak, 1):>8} "
              f"{f(r['decode_ms_per_token'], 1):>7} {f(r.get('logits_rel_diff_vs_single'), 4):>8}")
    for r in rows:
        if r.get("breakdown_ms"):
            for rank, phases in r["breakdown_ms"].items():
                total = phases["total"]
                parts = ", ".join(f"{k} {v:.0f} ({100 * v / total:.1f}%)" for k, v in phases.items() if k != "total")
                print(f"breakdown {r['len']} {r['method']} host {rank}: total {total:.0f} ms: {parts}")
    longest = max(r["len"] for r in rows)
    apb = next((r for r in rows if r["len"] == longest and r["method"] == "apb"), None)
    if apb is None:
        return
    vs = apb["speedup_vs"]
    targets = [("apb vs single", vs.get("single"), 2.5), ("apb vs ring", vs.get("ring"), 1.15),
               ("apb vs star", vs.get("star"), 2.0)]
    for name, value, goal in targets:
        verdict = "-" if value is None else ("met" if value >= goal else f"MISSED by {goal - value:.2f}x")
        print(f"target @{longest}: {name} {value if value is None else round(value, 3)} (goal >= {goal}): {verdict}")
    share = apb.get("all_gather_share")
    if share is not None:
        print(f"target @{longest}: all-gather share {100 * share:.2f}% (goal <= 2%): "
              f"{'met' if share <= 0.02 else 'MISSED'}")


if __name__ == "__main__":
    main(sys.argv[1])
