"""Run many `apb eval` cells side by side on one GPU, resumable across device calls (issue 17's GPU tables).

One eval process answers one question at a time and leaves most of an H200 idle with a 0.5B model (launch-bound
decode, one short prefill at a time), so the (length, method, H) cells run as separate processes at once. Every
process appends its rows to ROWS/<job>.<part>.jsonl; a later call with the same ROWS runs, for each job, only the
tasks that have fewer than `samples` rows, so a call cut by its time limit is continued by the next one (a task
cut half-way is run again; the table script keeps the last row of a (length, task, sample, method, hosts)).

    python scripts/gpu_eval_jobs.py --rows /tmp/keep/rows --model /tmp/keep/qwen.gguf --deadline EPOCH --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the 12 tasks where full scored above 20 at 8K (docs/quality.md), multi-fact tasks first: a cut run keeps those
T12 = ["niah_multiquery", "vt", "fwe", "niah_multivalue", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
       "niah_single_2", "niah_single_3", "niah_single_1", "passkey", "number_string"]
T6 = T12[:5] + ["niah_single_2"]  # the six run at 30K on 2026-12-01
NEW30 = [t for t in T12 if t not in T6]

# (name, length, methods, hosts, tasks, extra arguments); in priority order
JOBS: list[tuple[str, str, str, str, list[str], list[str]]] = [
    ("full16", "16k", "full", "2,4,8", T12 + ["cwe", "kv_retrieval"], ["--cite"]),
    ("apb16_8", "16k", "apb", "8", T12, ["--cite"]),
    ("apb16_4", "16k", "apb", "4", T12, ["--cite"]),
    ("apb16_2", "16k", "apb", "2", T12, ["--cite"]),
    ("full30", "30k", "full", "2,4,8", NEW30 + ["cwe", "kv_retrieval"], ["--cite"]),
    ("apb30_4", "30k", "apb", "4", T12, ["--cite"]),
    ("apb30_8", "30k", "apb", "8", NEW30, ["--cite"]),
    ("apb30_2", "30k", "apb", "2", T12, ["--cite"]),
    ("star16_8", "16k", "star", "8", T12, []),
    ("star16_4", "16k", "star", "4", T12, []),
    ("star16_2", "16k", "star", "2", T12, []),
    ("star30_4", "30k", "star", "4", T12, []),
    ("star30_8", "30k", "star", "8", NEW30, []),
    ("star30_2", "30k", "star", "2", T12, []),
    ("apb8_8", "8k", "apb", "8", T12, []),
    ("star8_8", "8k", "star", "8", T12, []),
    ("apb30_8_p1024", "30k", "apb", "8", T6, ["--passing-len", "1024"]),
    ("apb30_8_p2048", "30k", "apb", "8", T6, ["--passing-len", "2048"]),
]


def done_tasks(rows_dir: Path, name: str, samples: int, replicas: int) -> set[str]:
    """Tasks of job `name` with all their rows (samples x the hosts values a full row is copied to)."""
    counts: Counter[str] = Counter()
    seen: set[tuple] = set()
    for path in rows_dir.glob(f"{name}.*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the time limit
            key = (row["task"], row["index"], row["hosts"])
            if key not in seen:
                seen.add(key)
                counts[row["task"]] += 1
    return {task for task, n in counts.items() if n >= samples * replicas}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--deadline", type=float, required=True, help="epoch seconds by which every process has ended")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--parallel", type=int, default=14)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--only", default="", help="comma list of job names (default: all)")
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args = p.parse_args()
    rows_dir, out = Path(args.rows), Path(args.out)
    rows_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    queue = []
    for name, length, method, hosts, tasks, extra in JOBS:
        if only and name not in only:
            continue
        replicas = len(hosts.split(",")) if method == "full" else 1
        finished = done_tasks(rows_dir, name, args.samples, replicas)
        todo = [t for t in tasks if t not in finished]
        print(f"{name}: {len(finished)} tasks done, to run: {','.join(todo) or '-'}", flush=True)
        if todo:
            part = len(list(rows_dir.glob(f"{name}.*.jsonl")))
            cmd = [sys.executable, "-m", "apb_cli.main", "eval", "--tasks", ",".join(todo), "--len", length,
                   "--samples", str(args.samples), "--methods", method, "--hosts", hosts, "--workers", "1",
                   "--device", "cuda", "--model", args.model, "--max-new-tokens", str(args.max_new_tokens),
                   "--threads", "1", "--quiet", "--json", "--out", str(rows_dir / f"{name}.{part}.jsonl"), *extra]
            queue.append((name, part, cmd))
    if args.dry_run:
        for _, _, cmd in queue:
            print(" ".join(cmd[1:]))
        return
    running: list[tuple[str, subprocess.Popen, float]] = []
    t0 = time.time()
    while queue or running:
        while queue and len(running) < args.parallel and time.time() < args.deadline - 60:
            name, part, cmd = queue.pop(0)
            log = open(out / f"{name}.{part}.log", "w")
            left = max(1, int(args.deadline - time.time()))
            proc = subprocess.Popen(["timeout", "-s", "INT", "-k", "10", str(left), *cmd], cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT)
            running.append((name, proc, time.time()))
        if queue and time.time() >= args.deadline - 60:
            print(f"not started (deadline): {', '.join(q[0] for q in queue)}", flush=True)
            queue.clear()
        for item in list(running):
            name, proc, started = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"{name}: exit {proc.returncode} after {time.time() - started:.0f} s "
                      f"(t = {time.time() - t0:.0f} s)", flush=True)
        time.sleep(1)
    for path in rows_dir.glob("*.jsonl"):
        (out / path.name).write_bytes(path.read_bytes())
    os.sync()


if __name__ == "__main__":
    main()
