"""`apb bench`: parse options, call `apb_core.bench.run_bench`, render the table, JSON and bar chart.

Output contract (same as `apb ask`): stdout holds only the JSON (with `--json`); the tables, progress lines
and errors go to stderr; a bad option is one line "apb: error: ..." with exit code 2 before any model work.
main.py picks this module up through `register(app)`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from apb_core.errors import ApbError, InputError

DEVICES = ("auto", "cpu", "cuda")
PHASES = ("qkv", "compress", "wait", "all-gather", "all-to-all", "attention", "o-proj", "ffn", "other")


def _error_line(message: object) -> str:
    return "apb: error: " + (" ".join(str(message).split()) or "unknown error")


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def results_table(rows: list[dict[str, Any]]) -> Table:
    """One line per (length, method): time, throughput, speedup, FLOP rates, memory, decode."""
    table = Table(title="apb bench: prefill", title_justify="left")
    for name in ("len", "method", "GPUs", "prefill s", "tok/s", "vs full", "eff TFLOP/s", "exec TFLOP/s/GPU",
                 "busiest TFLOP/s", "peak GiB", "decode ms/tok", "logits Δ vs full"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for row in rows:
        peaks = [p for p in row["peak_mem_gib"] if p is not None]
        table.add_row(
            _tokens_label(row["len"]), row["method"] + ("" if row["exact"] else "*"), str(row["hosts"]),
            _fmt(row["prefill_s"], 3), _fmt(row["tokens_per_s"], 0), _fmt(row["speedup_vs_full"]),
            _fmt(row["effective_tflops"], 1), _fmt(row["executed_tflops_per_gpu"], 1),
            _fmt(row["busiest_host_tflops"], 1), _fmt(max(peaks) if peaks else None, 1),
            _fmt(row["decode_ms_per_token"], 1), _fmt(row.get("logits_rel_diff_vs_full"), 4),
        )
    table.caption = ("* approximate method; eff = exact causal FLOPs / time; exec = FLOPs the method runs; "
                     "logits Δ = ‖logits − full's‖ / ‖full's‖ after the query")
    return table


def speedup_table(rows: list[dict[str, Any]]) -> Table:
    """Row method's speedup over column method, per length (ratios of one run's medians)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = Table(title="speedup (row over column)", title_justify="left")
    table.add_column("len")
    table.add_column("method", justify="left")
    for m in methods:
        table.add_column(m, justify="right")
    for row in rows:
        cells = ["1" if m == row["method"] else _fmt(row["speedup_vs"].get(m)) for m in methods]
        table.add_row(_tokens_label(row["len"]), row["method"], *cells)
    return table


def breakdown_table(rows: list[dict[str, Any]]) -> Table | None:
    """Per-phase ms of the breakdown prefill (timers on), per host, with each phase's share."""
    with_data = [r for r in rows if r.get("breakdown_ms")]
    if not with_data:
        return None
    seen = {p for row in with_data for per_rank in row["breakdown_ms"].values() for p in per_rank}
    phases = [p for p in PHASES if p in seen] + sorted(seen - set(PHASES) - {"total"})
    table = Table(title="breakdown: ms per prefill (share), timers on", title_justify="left")
    for name in ("len", "method", "host", *phases, "total"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for row in with_data:
        for rank, per_rank in row["breakdown_ms"].items():
            total = per_rank["total"]
            cells = [f"{per_rank[p]:,.1f} ({100 * per_rank[p] / total:.1f}%)" if p in per_rank else "-"
                     for p in phases]  # ms (share of this host's breakdown prefill)
            table.add_row(_tokens_label(row["len"]), row["method"], rank, *cells, f"{total:,.1f}")
    return table


def write_plot(rows: list[dict[str, Any]], path: str) -> None:
    """Grouped bars: prefill seconds per method at each length (log scale when lengths differ a lot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(dict.fromkeys(r["len"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(lengths) * max(1, len(methods) / 3), 4))
    for i, method in enumerate(methods):
        xs, ys = [], []
        for j, length in enumerate(lengths):
            match = [r for r in rows if r["len"] == length and r["method"] == method]
            if match and match[0]["prefill_s"]:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(match[0]["prefill_s"])
        ax.bar(xs, ys, width, label=method)
    ax.set_xticks(range(len(lengths)), [_tokens_label(n) for n in lengths])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("prefill seconds (median)")
    hosts = max(r["hosts"] for r in rows)
    ax.set_title(f"apb bench: prefill time, {hosts} hosts (full = 1 GPU)")
    if len(lengths) > 1:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench(
    length: Annotated[
        str, typer.Option("--len", help="Context tokens: 2k, 32k, 128k, 131072 or a comma list.")
    ] = "32k",
    hosts: Annotated[
        int | None, typer.Option("--hosts", help="Workers. Default: visible GPUs on cuda, else 2.", show_default=False)
    ] = None,
    methods: Annotated[
        str, typer.Option("--methods", help="Comma list: hf (plain transformers), full, ring, ulysses, allgather, "
                          "star, apb.")
    ] = "full,ring,ulysses,star,apb",
    preset: Annotated[
        str | None, typer.Option("--preset", help="Random-weight model shape: llama-3.1-8b, qwen2.5-14b, tiny.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="A local model (HF folder or .gguf) instead.")] = None,
    repeat: Annotated[int, typer.Option("--repeat", help="Timed prefills per method (after one warm-up).")] = 3,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda (auto: cuda if any).")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object (a row per method).")] = False,
    plot: Annotated[str | None, typer.Option("--plot", help="Write a bar chart of prefill times (PNG).")] = None,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Greedy tokens timed after prefill.")] = 8,
    breakdown: Annotated[
        str, typer.Option("--breakdown", help="Methods to time phase by phase (one extra prefill each), or none.")
    ] = "apb",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights and the random prompt.")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads per worker.")] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto|fp32|bf16|fp16 (auto: fp32 on CPU, bf16 on GPU).")
    ] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="Nothing on stderr but errors.")] = False,
) -> None:
    """Time prefill (and decode) of full, ring, Ulysses, Star and APB on one random prompt."""
    code = run_cli(length=length, hosts=hosts, methods=methods, preset=preset, model=model, repeat=repeat,
                   device=device, json_output=json_output, plot=plot, decode_tokens=decode_tokens,
                   breakdown=breakdown, seed=seed, threads=threads, dtype=dtype, quiet=quiet)
    if code:
        raise typer.Exit(code)


def build_config(opts: dict[str, Any], cuda_count=_cuda_count):
    """Check the options (InputError names the first bad one) and return a BenchConfig."""
    from apb_core.bench import METHODS, BenchConfig, parse_lengths

    lengths = parse_lengths(opts["length"])
    if opts["device"] not in DEVICES:
        raise InputError(f"--device must be one of {', '.join(DEVICES)} (got {opts['device']!r})")
    if opts["preset"] and opts["model"]:
        raise InputError("give --preset or --model, not both")
    methods = [m.strip() for m in opts["methods"].split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"--methods: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    value = opts["breakdown"].strip().lower()
    breakdown = [] if value in ("", "none") else [m.strip() for m in value.split(",")]
    if any(m not in METHODS for m in breakdown):
        raise InputError(f"--breakdown takes method names or none (got {opts['breakdown']!r})")
    gpus = cuda_count() if opts["device"] in ("auto", "cuda") else 0
    if opts["device"] == "cuda" and gpus == 0:
        raise InputError("--device cuda: no CUDA GPU is visible")
    resolved = "cuda" if opts["device"] == "cuda" or (opts["device"] == "auto" and gpus > 0) else "cpu"
    hosts = opts["hosts"] if opts["hosts"] is not None else (gpus if resolved == "cuda" else 2)
    if hosts < 1:
        raise InputError(f"--hosts must be at least 1 (got {hosts})")
    if resolved == "cuda" and hosts > gpus:
        raise InputError(f"--hosts {hosts} needs {hosts} GPUs but only {gpus} are visible")
    if opts["plot"]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    preset = opts["preset"] or (None if opts["model"] else "llama-3.1-8b")
    dtype = str(opts.get("dtype") or "auto").lower()
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise InputError(f"--dtype must be auto, fp32, bf16 or fp16 (got {opts.get('dtype')!r})")
    return BenchConfig(lengths=lengths, hosts=hosts, methods=methods, preset=preset, model=opts["model"],
                       device=resolved, repeat=opts["repeat"], decode_tokens=opts["decode_tokens"],
                       breakdown=breakdown, seed=opts["seed"], threads=opts["threads"],
                       dtype=None if dtype == "auto" else dtype)


def run_cli(**opts: Any) -> int:
    """Run `apb bench`; returns the exit code after printing at most one error line."""
    # wide tables when stderr is a file or a pipe (logs), the terminal's width otherwise
    width = None if sys.stderr.isatty() else 200
    console = Console(stderr=True, highlight=False, quiet=opts["quiet"], width=width)
    try:
        config = build_config(opts)
        from apb_core.bench import run_bench

        def on_event(event) -> None:
            if event.phase == "bench" and event.kind == "progress" and event.done == 0:
                console.print(f"apb bench: {event.text.replace(' ', ' @ ')} tokens, {event.total} prefills")

        console.print(f"apb bench: {config.preset or config.model} on {config.hosts} {config.device} host(s), "
                      f"methods {', '.join(config.methods)}")
        report = run_bench(config, on_event=on_event)
        if opts["json_output"]:
            sys.stdout.write(json.dumps(report.payload()) + "\n")
            sys.stdout.flush()
        if opts["plot"]:
            write_plot(report.rows, opts["plot"])
            console.print(f"apb bench: wrote {opts['plot']}")
        console.print(results_table(report.rows))
        if len(config.methods) > 1:
            console.print(speedup_table(report.rows))
        table = breakdown_table(report.rows)
        if table is not None:
            console.print(table)
        return 0
    except ApbError as exc:
        print(_error_line(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("apb: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("APB_DEBUG") == "1":
            traceback.print_exc(file=sys.stderr)
        print(_error_line(f"unexpected {type(exc).__name__}: {exc} (set APB_DEBUG=1 for the traceback)"),
              file=sys.stderr)
        return 1


def register(app: typer.Typer) -> None:
    """Add `apb bench` to the `apb` app (main.py calls this when the module exists)."""
    app.command("bench")(bench)


if __name__ == "__main__":  # `python -m apb_cli.bench ...`: the bench command alone, without the other commands
    _app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(_app)
    _app()
