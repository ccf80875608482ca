"""`apb eval`: the offline long-context quality suite (RULER/InfiniteBench-style synthetic tasks).

Checks the options (`EvalOptions`: every bad one is one `apb: error: ...` line, exit 2, before any model work),
calls `apb_core.eval.runner.run_eval`, and renders: a progress line per scored answer and the accuracy table
(task x method x hosts, with the gap to `full`) on stderr, one JSON object on stdout with `--json`, and every
sample in the JSONL file given by `--out`. No algorithm lives here.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from apb_cli import handler
from apb_cli.options import EvalOptions, expand_tasks, parse_host_list, parse_tokens, split_list
from apb_core.eval.tasks import TASKS  # names only (no torch): listed in `apb eval --help`


def eval_command(
    tasks: Annotated[
        str,
        typer.Option("--tasks", help=f"Comma list of tasks, or all|ruler|infinitebench. Tasks: {', '.join(TASKS)}."),
    ] = "all",
    lengths: Annotated[
        str, typer.Option("--len", help="Comma list of prompt sizes in tokens: 4k, 7.5k, 4000 (k = 1024).")
    ] = "4k",
    samples: Annotated[int, typer.Option("--samples", help="Samples per task and length.")] = 3,
    methods: Annotated[str, typer.Option("--methods", help="Comma list of full, star, apb.")] = "full,star,apb",
    hosts: Annotated[str, typer.Option("--hosts", help="Comma list of host counts, e.g. 2,4.")] = "2",
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Worker processes for every --hosts value (dividing each); fewer than hosts: "
                     "the hosts of a worker take turns (same math). Default: one per host.", show_default=False),
    ] = None,
    model: Annotated[
        str | None, typer.Option("-m", "--model", help="Local HF model directory or .gguf. Default: embedded model.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated samples (and random compressor).")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    out: Annotated[
        str | None,
        typer.Option("--out", help="JSONL file, one row per sample. Default: apb-eval-<time>.jsonl here."),
    ] = None,
    compressor: Annotated[
        str | None,
        typer.Option("--compressor", help="apb only: query_aware (default) | retaining_heads (needs "
                                          "--retaining-heads) | random. A non-default one always runs compressed."),
    ] = None,
    retaining_heads: Annotated[
        str | None,
        typer.Option("--retaining-heads", help="apb only: safetensors file of Locret-style retaining heads "
                                               "(implies --compressor retaining_heads)."),
    ] = None,
    question_in_anchor: Annotated[
        bool,
        typer.Option("--question-in-anchor/--no-question-in-anchor", help="apb only: the question in the anchor."),
    ] = True,
    auto_exact: Annotated[
        bool,
        typer.Option("--auto-exact/--no-auto-exact",
                     help="apb only: exact layout where it costs about as much (off: always compress)."),
    ] = True,
    layout: Annotated[
        str, typer.Option("--layout", help="apb only: balanced|equal blocks (the others run balanced).")
    ] = "balanced",
    anchor_len: Annotated[
        int | None, typer.Option("--anchor-len", help="apb only: anchor length. Default: by context.")
    ] = None,
    passing_len: Annotated[
        str | None, typer.Option("--passing-len", help="apb only: passing length, 0 (none) or 'all'.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda (auto: cuda if any).")] = "auto",
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Cap on each task's answer budget (RULER's).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads per worker. Default: cores / hosts.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress lines or table on stderr.")] = False,
    split_questions: Annotated[
        bool,
        typer.Option("--split-questions",
                     help="niah_multikey_1/niah_multiquery: ask each key as its own question about the document; "
                          "apb answers them with one prefill each and again over one shared prefill (apb+shared)."),
    ] = False,
    reuse_prefill: Annotated[
        bool,
        typer.Option("--reuse-prefill",
                     help="With --split-questions: apb also answers each key's question over the prefill made for "
                          "another key's question (apb+reuse): what `apb serve`'s \"apb\": {\"reuse\": true} does."),
    ] = False,
    cite: Annotated[
        bool, typer.Option("--cite", help="Cite sources too; needle tasks record cite_hit (the top citation holds "
                                          "the needle).")
    ] = False,
) -> None:
    """Score full, Star and APB on synthetic long-context tasks (RULER / InfiniteBench style), offline."""

    def body() -> int:
        return run_eval_command(EvalOptions(
            tasks=expand_tasks(tasks), lengths=tuple(parse_tokens(lengths)), samples=samples,
            methods=tuple(split_list(methods)), hosts=parse_host_list(hosts), workers=workers, model=model, seed=seed,
            json_output=json_output, out=out, compressor=compressor, question_in_anchor=question_in_anchor,
            auto_exact=auto_exact, layout=layout.strip().lower(), anchor_len=anchor_len, passing_len=passing_len,
            device=device,
            max_new_tokens=max_new_tokens, threads=threads, quiet=quiet, split_questions=split_questions,
            reuse_prefill=reuse_prefill, retaining_heads=retaining_heads, cite=cite,
        ))

    code = handler.run_command(body)
    if code:
        raise typer.Exit(code)


def run_eval_command(opts: EvalOptions) -> int:
    """Resolve the model, run the suite with a progress line per scored answer, print the tables and JSON."""
    from apb_core import models
    from apb_core.eval.runner import EvalConfig, run_eval

    console = Console(stderr=True, highlight=False, quiet=opts.quiet)
    if not console.is_terminal:  # a log file: rich's 80-column default would fold the table's cells
        console.width = 160
    models.resolve_model(opts.model)  # a bad path fails before any work
    config = EvalConfig(tasks=list(opts.tasks), lengths=list(opts.lengths), samples=opts.samples,
                        methods=list(opts.methods), hosts=list(opts.hosts), model=opts.model, seed=opts.seed,
                        device=opts.device, max_new_tokens=opts.max_new_tokens, threads=opts.threads,
                        ablation=opts.ablation(), split_questions=opts.split_questions,
                        reuse_prefill=opts.reuse_prefill,
                        retaining_heads=opts.retaining_heads, cite=opts.cite, workers=list(opts.workers_per_hosts))
    for note in opts.notes:
        console.print(f"[dim]apb: note: {note}[/]")
    console.print(f"[dim]apb eval: {len(opts.tasks)} task(s) x {len(opts.lengths)} length(s) x "
                  f"{opts.samples} sample(s); methods {', '.join(opts.methods)}; hosts "
                  f"{', '.join(map(str, opts.hosts))}; rows -> {opts.out}[/]")

    def progress(row: dict[str, Any], done: int, total: int) -> None:
        if row["reused_from_hosts"] is not None:
            return
        console.print(
            f"[dim][{done:>4}/{total}][/] {row['length']:>6} {row['task']:<16} #{row['index']:<2} "
            f"{row['method']:<4} H={row['hosts']}  score {row['score']:.2f}  prefill "
            f"{row['timings'].get('prefill_s', 0.0):6.1f}s  total {row['timings'].get('total_s', 0.0):6.1f}s"
            + ("" if row.get("cite_hit") is None else f"  cite_hit {row['cite_hit']:.0f}"),
            markup=True,
        )

    summary = run_eval(config, out_path=opts.out, on_row=progress)
    for table in accuracy_tables(summary.to_dict()):
        console.print(table)
    for note in summary.notes:
        console.print(f"[dim]note: {note}[/]")
    console.print(f"[dim]{summary.rows} rows in {opts.out}; {summary.wall_s:.0f} s[/]")
    if opts.json_output:
        payload = summary.to_dict()
        payload["notes"] = [*opts.notes, *payload["notes"]]  # the choices apb made on its own (placement) first
        sys.stdout.write(json.dumps(payload | {"out": opts.out}, allow_nan=False) + "\n")
        sys.stdout.flush()
    return 0


def column_keys(summary: dict[str, Any]) -> list[tuple[str, int]]:
    """Table columns: one `full` (identical at every H), then each other method at each hosts value."""
    config = summary["config"]
    keys: list[tuple[str, int]] = []
    if "full" in config["methods"]:
        keys.append(("full", config["hosts"][0]))
    for hosts in config["hosts"]:
        keys += [(m, hosts) for m in config["methods"] if m != "full"]
        if config.get("split_questions") and "apb" in config["methods"]:
            keys.append(("apb+shared", hosts))  # apb's per-key questions over one prefill (eval.runner)
        if config.get("reuse_prefill"):
            keys.append(("apb+reuse", hosts))  # ... each over the prefill made for another key's question
    return keys


def accuracy_tables(summary: dict[str, Any]) -> list[Table]:
    """One rich table per length: rows = tasks + average, columns = method x hosts, cells 'acc (delta vs full)',
    then the average's 95% intervals and target verdict in rows of their own (per-task intervals: --json), so
    the cells stay short enough for several hosts values in 160 columns."""
    config = summary["config"]
    keys = column_keys(summary)
    by_key = {(c["length"], c["task"], c["method"], c["hosts"]): c for c in summary["cells"] + summary["averages"]}
    tables = []
    for length in config["lengths"]:
        samples = config["samples"]
        has_ci = any(c.get("accuracy_ci") is not None for c in summary["averages"])  # old summaries have none
        caption = "(delta vs full, points)" + (
            "; average's 95% bootstrap intervals, delta paired with full on the same samples; target: the delta "
            "interval vs -1 (per-task intervals: --json)" if has_ci else "")
        table = Table(title=f"{length:,} tokens: accuracy, {samples} sample(s)/task", title_justify="left",
                      caption=caption, caption_justify="left")
        table.add_column("task")
        for method, hosts in keys:
            table.add_column("full (any H)" if method == "full" else f"{method} H={hosts}", justify="right")
        for task in [*config["tasks"], "average"]:
            cells = []
            for method, hosts in keys:
                cell = by_key.get((length, task, method, hosts))
                cells.append(format_cell(cell, method))
            table.add_row(task, *cells, end_section=task == config["tasks"][-1])
        if has_ci:
            averages = [by_key.get((length, "average", method, hosts)) for method, hosts in keys]
            for label, row in interval_rows(averages, [method for method, _ in keys]):
                table.add_row(label, *row)
        tables.append(table)
    return tables


def interval_rows(averages: list[dict[str, Any] | None], methods: list[str]) -> list[tuple[str, list[str]]]:
    """The rows under 'average': accuracy interval, delta interval and target verdict per column ('-' where
    none: full is the reference, so it has no delta row entry)."""
    acc = [format_interval(c and c.get("accuracy_ci")) for c in averages]
    delta = ["-" if m == "full" else format_interval(c and c.get("delta_ci"), signed=True)
             for c, m in zip(averages, methods, strict=True)]
    target = [(c and c.get("target")) or "-" for c in averages]
    return [("acc 95% CI", acc), ("delta 95% CI", delta), ("target >= -1", target)]


def format_interval(ci: list[float] | None, signed: bool = False) -> str:
    """'78.6..96.4' (accuracy) or '-8.3..+0.0' (signed: a delta); '-' without an interval."""
    if not ci:
        return "-"
    spec = "+.1f" if signed else ".1f"
    return f"{ci[0]:{spec}}..{ci[1]:{spec}}"


def format_cell(cell: dict[str, Any] | None, method: str) -> str:
    """'83.3' for full, '66.7 (-16.7)' for the others; '-' where nothing ran."""
    if cell is None:
        return "-"
    text = f"{cell['accuracy']:.1f}"
    if method != "full" and cell["delta_vs_full"] is not None:
        text += f" ({cell['delta_vs_full']:+.1f})"
    if cell.get("cite_hit") is not None:
        text += f" [cite {cell['cite_hit']:.0f}]"
    return text
