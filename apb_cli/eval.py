"""`apb eval`: the offline long-context quality suite (RULER/InfiniteBench-style synthetic tasks).

Parses and checks the options (every bad one is one `apb: error: ...` line, exit 2, before any model work),
calls `apb_core.eval.runner.run_eval`, and renders: a progress line per scored answer and the accuracy table
(task x method x hosts, with the gap to `full`) on stderr, one JSON object on stdout with `--json`, and every
sample in the JSONL file given by `--out`. No algorithm lives here.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from apb_core.errors import ApbError, InputError

DEVICES = ("auto", "cpu", "cuda")
COMPRESSORS = ("query_aware", "random")  # retaining_heads needs a trained heads file: not an eval option yet


@dataclass
class EvalOptions:
    """`apb eval`'s options after validation."""

    tasks: list[str]
    lengths: list[int]
    methods: list[str]
    hosts: list[int]
    device: str
    ablation: dict[str, Any]
    out: str


def parse_length(text: str) -> int:
    """'4k' -> 4096, '7.5k' -> 7680, '4000' -> 4000 (k = 1024, as RULER's 4K = 4096)."""
    value = text.strip().lower()
    try:
        number = float(value[:-1]) * 1024 if value.endswith("k") else float(value)
    except ValueError:
        raise InputError(f"--len: {text!r} is not a token count like 4k, 7.5k or 4000") from None
    if not math.isfinite(number) or number < 1 or number != int(number):
        raise InputError(f"--len: {text!r} is not a whole positive number of tokens")
    return int(number)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def validate_eval(
    *,
    tasks: str,
    lengths: str,
    samples: int,
    methods: str,
    hosts: str,
    device: str,
    compressor: str | None,
    question_in_anchor: bool,
    anchor_len: int | None,
    passing_len: str | None,
    max_new_tokens: int | None,
    threads: int | None,
    out: str | None,
    auto_exact: bool = True,
) -> EvalOptions:
    """Check `apb eval`'s options; raise InputError naming the first bad one (torch is imported only for
    --device auto|cuda, to count GPUs)."""
    from apb_cli.main import _cuda_count  # imported here: apb_cli.main imports this module while it loads
    from apb_core.eval.runner import METHODS, TASK_GROUPS
    from apb_core.eval.tasks import TASKS

    task_list: list[str] = []
    for name in _split(tasks):
        if name in TASK_GROUPS:
            task_list += TASK_GROUPS[name]
        elif name in TASKS:
            task_list.append(name)
        else:
            raise InputError(f"--tasks: unknown task {name!r}; choose from {', '.join([*TASK_GROUPS, *TASKS])}")
    task_list = list(dict.fromkeys(task_list))
    if not task_list:
        raise InputError("--tasks: no task given")
    length_list = list(dict.fromkeys(parse_length(x) for x in _split(lengths)))
    if not length_list:
        raise InputError("--len: no length given")
    if samples < 1:
        raise InputError(f"--samples must be at least 1 (got {samples})")
    method_list = list(dict.fromkeys(_split(methods)))
    bad = [m for m in method_list if m not in METHODS]
    if bad or not method_list:
        raise InputError(f"--methods must be a comma list of {', '.join(METHODS)} (got {methods!r})")
    host_list: list[int] = []
    for part in _split(hosts):
        try:
            host_list.append(int(part))
        except ValueError:
            raise InputError(f"--hosts must be a comma list of whole numbers (got {hosts!r})") from None
    if not host_list or any(h < 1 for h in host_list):
        raise InputError(f"--hosts: every value must be at least 1 (got {hosts!r})")
    host_list = list(dict.fromkeys(host_list))
    if device not in DEVICES:
        raise InputError(f"--device must be one of {', '.join(DEVICES)} (got {device!r})")
    ablation: dict[str, Any] = {}
    if compressor is not None:
        if compressor not in COMPRESSORS:
            raise InputError(f"--compressor must be one of {', '.join(COMPRESSORS)} (got {compressor!r})")
        ablation["compressor"] = compressor
    if not question_in_anchor:
        ablation["question_in_anchor"] = False
    if not auto_exact:
        ablation["auto_exact"] = False
    if anchor_len is not None:
        if anchor_len < 0:
            raise InputError(f"--anchor-len must not be negative (got {anchor_len})")
        ablation["anchor_len"] = anchor_len
    if passing_len is not None:
        value = passing_len.strip().lower()
        if value == "all":
            ablation["passing_len"] = "all"
        else:
            try:
                ablation["passing_len"] = int(value)
            except ValueError:
                raise InputError(f"--passing-len must be a whole number, 0 or 'all' (got {passing_len!r})") from None
            if ablation["passing_len"] < 0:
                raise InputError(f"--passing-len must not be negative (got {passing_len})")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1 (got {threads})")

    gpus = _cuda_count() if device in ("auto", "cuda") else 0
    if device == "cuda" and gpus == 0:
        raise InputError("--device cuda: no CUDA GPU is visible")
    resolved = "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"
    if resolved == "cuda" and max(host_list) > gpus:
        raise InputError(f"--hosts {max(host_list)} needs {max(host_list)} GPUs but only {gpus} are visible")
    if out is None:
        out = time.strftime("apb-eval-%Y%m%d-%H%M%S.jsonl")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise InputError(f"--out: the folder {out_dir} does not exist")
    return EvalOptions(tasks=task_list, lengths=length_list, methods=method_list, hosts=host_list,
                       device=resolved, ablation=ablation, out=out)


def register(app: typer.Typer) -> None:
    """Add `apb eval` to the CLI (apb_cli.main calls this when the module exists)."""

    @app.command("eval")
    def eval_command(
        tasks: Annotated[
            str, typer.Option("--tasks", help="Comma list of tasks, or all|ruler|infinitebench.")
        ] = "all",
        lengths: Annotated[
            str, typer.Option("--len", help="Comma list of prompt sizes in tokens: 4k, 7.5k, 4000 (k = 1024).")
        ] = "4k",
        samples: Annotated[int, typer.Option("--samples", help="Samples per task and length.")] = 3,
        methods: Annotated[str, typer.Option("--methods", help="Comma list of full, star, apb.")] = "full,star,apb",
        hosts: Annotated[str, typer.Option("--hosts", help="Comma list of host counts, e.g. 2,4.")] = "2",
        model: Annotated[
            str | None, typer.Option("--model", help="Local HF model directory or .gguf. Default: embedded model.")
        ] = None,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the generated samples (and random compressor).")] = 0,
        json_output: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
        out: Annotated[
            str | None,
            typer.Option("--out", help="JSONL file, one row per sample. Default: apb-eval-<time>.jsonl here."),
        ] = None,
        compressor: Annotated[
            str | None, typer.Option("--compressor", help="apb only: query_aware (default) | random.")
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
    ) -> None:
        """Score full, Star and APB on synthetic long-context tasks (RULER / InfiniteBench style), offline."""
        code = _eval(tasks=tasks, lengths=lengths, samples=samples, methods=methods, hosts=hosts, model=model,
                     seed=seed, json_output=json_output, out=out, compressor=compressor,
                     question_in_anchor=question_in_anchor, anchor_len=anchor_len, passing_len=passing_len,
                     auto_exact=auto_exact, device=device, max_new_tokens=max_new_tokens, threads=threads, quiet=quiet)
        if code:
            raise typer.Exit(code)


def _eval(**opts: Any) -> int:
    """Run `apb eval`; returns the exit code after printing at most one error line."""
    from rich.console import Console

    from apb_cli.main import _error_line

    console = Console(stderr=True, highlight=False, quiet=opts["quiet"])
    if not console.is_terminal:  # a log file: rich's 80-column default would fold the table's cells
        console.width = 160
    try:
        options = validate_eval(
            tasks=opts["tasks"], lengths=opts["lengths"], samples=opts["samples"], methods=opts["methods"],
            hosts=opts["hosts"], device=opts["device"], compressor=opts["compressor"],
            question_in_anchor=opts["question_in_anchor"], anchor_len=opts["anchor_len"],
            passing_len=opts["passing_len"], max_new_tokens=opts["max_new_tokens"], threads=opts["threads"],
            out=opts["out"], auto_exact=opts.get("auto_exact", True),
        )
        importlib.import_module("apb_core.model").resolve_model(opts["model"])  # a bad path fails before work
        from apb_core.eval.runner import EvalConfig, run_eval

        config = EvalConfig(tasks=options.tasks, lengths=options.lengths, samples=opts["samples"],
                            methods=options.methods, hosts=options.hosts, model=opts["model"], seed=opts["seed"],
                            device=options.device, max_new_tokens=opts["max_new_tokens"], threads=opts["threads"],
                            ablation=options.ablation)
        console.print(f"[dim]apb eval: {len(options.tasks)} task(s) x {len(options.lengths)} length(s) x "
                      f"{opts['samples']} sample(s); methods {', '.join(options.methods)}; hosts "
                      f"{', '.join(map(str, options.hosts))}; rows -> {options.out}[/]")

        def progress(row: dict[str, Any], done: int, total: int) -> None:
            if row["reused_from_hosts"] is not None:
                return
            console.print(
                f"[dim][{done:>4}/{total}][/] {row['length']:>6} {row['task']:<16} #{row['index']:<2} "
                f"{row['method']:<4} H={row['hosts']}  score {row['score']:.2f}  prefill "
                f"{row['timings'].get('prefill_s', 0.0):6.1f}s  total {row['timings'].get('total_s', 0.0):6.1f}s",
                markup=True,
            )

        summary = run_eval(config, out_path=options.out, on_row=progress)
        for table in accuracy_tables(summary.to_dict()):
            console.print(table)
        for note in summary.notes:
            console.print(f"[dim]note: {note}[/]")
        console.print(f"[dim]{summary.rows} rows in {options.out}; {summary.wall_s:.0f} s[/]")
        if opts["json_output"]:
            sys.stdout.write(json.dumps(summary.to_dict() | {"out": options.out}, allow_nan=False) + "\n")
            sys.stdout.flush()
        return 0
    except ApbError as exc:
        return _fail(_error_line(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _fail("apb: interrupted", 130)
    except Exception as exc:
        if os.environ.get("APB_DEBUG") == "1":
            traceback.print_exc(file=sys.stderr)
        return _fail(_error_line(f"unexpected {type(exc).__name__}: {exc} (set APB_DEBUG=1 for the traceback)"), 1)


def _fail(line: str, code: int) -> int:
    print(line, file=sys.stderr)
    sys.stderr.flush()
    return code


def column_keys(summary: dict[str, Any]) -> list[tuple[str, int]]:
    """Table columns: one `full` (identical at every H), then each other method at each hosts value."""
    config = summary["config"]
    keys: list[tuple[str, int]] = []
    if "full" in config["methods"]:
        keys.append(("full", config["hosts"][0]))
    for hosts in config["hosts"]:
        keys += [(m, hosts) for m in config["methods"] if m != "full"]
    return keys


def accuracy_tables(summary: dict[str, Any]) -> list[Any]:
    """One rich table per length: rows = tasks + average, columns = method x hosts, cells 'acc (delta vs full)'."""
    from rich.table import Table

    config = summary["config"]
    keys = column_keys(summary)
    by_key = {(c["length"], c["task"], c["method"], c["hosts"]): c for c in summary["cells"] + summary["averages"]}
    tables = []
    for length in config["lengths"]:
        samples = config["samples"]
        table = Table(title=f"{length:,} tokens: accuracy, {samples} sample(s)/task", title_justify="left",
                      caption="(delta vs full, points)", caption_justify="left")
        table.add_column("task")
        for method, hosts in keys:
            table.add_column("full (any H)" if method == "full" else f"{method} H={hosts}", justify="right")
        for task in [*config["tasks"], "average"]:
            cells = []
            for method, hosts in keys:
                cell = by_key.get((length, task, method, hosts))
                cells.append(format_cell(cell, method))
            table.add_row(task, *cells, end_section=task == config["tasks"][-1])
        tables.append(table)
    return tables


def format_cell(cell: dict[str, Any] | None, method: str) -> str:
    """'83.3' for full, '66.7 (-16.7)' for the others; '-' where nothing ran."""
    if cell is None:
        return "-"
    text = f"{cell['accuracy']:.1f}"
    if method != "full" and cell["delta_vs_full"] is not None:
        text += f" ({cell['delta_vs_full']:+.1f})"
    return text
