"""`apb bench`: check the options, call `apb_core.bench.run_bench`, render the tables, JSON and bar chart.

Methods (apb_core/bench): `single` is the one-GPU baseline (rank 0 alone, the whole context); `full` is exact
attention over H hosts, the same meaning as in `apb ask`; ring, ulysses (exact), star and apb (approximate);
`hf` is plain transformers in this process. Output contract (same as `apb ask`): stdout holds only the JSON
(with `--json`); tables, progress lines and errors go to stderr; a bad option is one line "apb: error: ..."
with exit code 2 before any model work.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from apb_cli import handler
from apb_cli.options import BenchOptions, parse_breakdown, parse_tokens, split_list
from apb_core.api import Event

DEFAULT_METHODS = "single,ring,ulysses,star,apb"  # apb_core.bench.runner.DEFAULT_METHODS, written out
PHASES = ("qkv", "compress", "wait", "all-gather", "all-to-all", "attention", "o-proj", "ffn", "other")


def bench(
    length: Annotated[
        str, typer.Option("--len", help="Context tokens: 2k, 32k, 128k, 131072 or a comma list (k = 1024).")
    ] = "32k",
    hosts: Annotated[
        int | None,
        typer.Option("--hosts", help="Workers. Default: visible GPUs on cuda; on CPU 2, or 1 below 4 cores.",
                     show_default=False),
    ] = None,
    methods: Annotated[
        str | None, typer.Option("--methods", help="Comma list: hf (plain transformers), single (rank 0 alone, one "
                                 "GPU), ring, ulysses, full (exact over the hosts), star, apb. "
                                 f"Default: {DEFAULT_METHODS}.", show_default=False)
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Worker processes (dividing --hosts); fewer than hosts: the hosts of a worker "
                     "take turns and the row shows a projected H-GPU prefill. Default: one per host.",
                     show_default=False),
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="Random-weight model shape: llama-3.1-8b (default on GPUs), "
                                 "qwen2.5-14b, smollm2-135m (default on CPU), tiny.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("-m", "--model", help="A local model (HF folder or .gguf) instead.")
    ] = None,
    repeat: Annotated[int, typer.Option("--repeat", help="Timed prefills per method (after one warm-up).")] = 3,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda (auto: cuda if any).")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object (a row per method).")] = False,
    plot: Annotated[str | None, typer.Option("--plot", help="Write a bar chart of prefill times (PNG).")] = None,
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", help="Greedy tokens timed after prefill (answer_s counts them).")
    ] = 128,
    breakdown: Annotated[
        str, typer.Option("--breakdown", help="Methods to time phase by phase (one extra prefill each), or none.")
    ] = "apb",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights and the random prompt.")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads per worker.")] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto|fp32|bf16|fp16 (auto: fp32 on CPU, bf16 on GPU).")
    ] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="Nothing on stderr but errors.")] = False,
    decode: Annotated[
        str, typer.Option("--decode", help="auto|eager|static|graph: how decode steps run (auto: CUDA graphs on GPU).")
    ] = "auto",
    layout: Annotated[
        str, typer.Option("--layout", help="balanced|equal blocks for full, star and apb (ring/Ulysses: their own).")
    ] = "balanced",
    auto_exact: Annotated[
        bool, typer.Option("--auto-exact/--no-auto-exact",
                           help="apb as `apb ask` runs it: exact where that costs about as much (default: always APB).")
    ] = False,
    questions: Annotated[
        int, typer.Option("--questions", help="Questions answered over each prefill (answer_s counts them all).")
    ] = 1,
    cite: Annotated[
        bool, typer.Option("--cite", help="Decode as `apb ask --cite` does (collects the attention for citations).")
    ] = False,
) -> None:
    """Time prefill (and decode) of single-GPU, ring, Ulysses, Star and APB on one random prompt."""

    def body() -> int:
        return run_bench_command(BenchOptions(
            lengths=tuple(parse_tokens(length)), hosts=hosts, methods=tuple(split_list(methods or DEFAULT_METHODS)),
            methods_given=methods is not None, workers=workers, preset=preset,
            model=model, repeat=repeat, device=device, json_output=json_output, plot=plot,
            decode_tokens=decode_tokens, breakdown=parse_breakdown(breakdown), seed=seed, threads=threads,
            dtype=dtype.strip().lower(), quiet=quiet, decode=decode.strip().lower(), layout=layout.strip().lower(),
            auto_exact=auto_exact, questions=questions, cite=cite,
        ))

    code = handler.run_command(body)
    if code:
        raise typer.Exit(code)


def run_bench_command(opts: BenchOptions) -> int:
    """Run the benchmark and print the JSON (stdout), the chart (file) and the tables (stderr)."""
    from apb_core.bench import run_bench  # torch: only now that the options are good

    # wide tables when stderr is a file or a pipe (logs), the terminal's width otherwise
    console = Console(stderr=True, highlight=False, quiet=opts.quiet, width=None if sys.stderr.isatty() else 200)

    def on_event(event: Event) -> None:
        if event.phase == "bench" and event.kind == "progress" and event.done == 0:
            console.print(f"apb bench: {event.text.replace(' ', ' @ ')} tokens, {event.total} prefills")

    for warning in opts.warnings:
        console.print(f"[yellow]apb: warning:[/] {warning}")
    for note in opts.notes:
        console.print(f"[dim]apb: note: {note}[/]")
    console.print(f"apb bench: {opts.preset or opts.model} on {opts.hosts} {opts.device} host(s), "
                  f"methods {', '.join(opts.methods)}")
    report = run_bench(opts.config(), on_event=on_event)
    payload = report.payload() | {"notes": list(opts.notes), "warnings": list(opts.warnings)}
    if opts.device == "cpu":
        payload["machine"] = payload["machine"] | {"peak_rss_gib": peak_rss_gib()}
    if opts.json_output:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()
    if opts.plot:
        write_plot(report.rows, opts.plot)
        console.print(f"apb bench: wrote {opts.plot}")
    console.print(results_table(report.rows, opts.device, one_device=opts.workers < opts.hosts))
    if opts.device == "cpu":
        console.print(f"[dim]peak resident memory: {payload['machine']['peak_rss_gib']:.2f} GiB (the largest "
                      "process of the run; CPU runs have no per-method peak)[/]")
    if len(opts.methods) > 1:
        console.print(speedup_table(report.rows))
        console.print(speedup_table(report.rows, "answer_speedup_vs", "answer speedup (row over column)"))
    for table in (projected_table(report.rows), breakdown_table(report.rows)):
        if table is not None:
            console.print(table)
    return 0


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _tokens_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def peak_rss_gib() -> float:
    """The largest resident set of this process and its finished workers (Linux reports KiB), in GiB."""
    import resource

    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return kib / 2**20


def results_table(rows: list[dict[str, Any]], device: str = "cuda", one_device: bool = False) -> Table:
    """One line per (length, method): time, throughput, speedup, FLOP rates, memory, decode.

    On CPU the hosts are processes ("hosts", not "GPUs"), rates are GFLOP/s (TFLOP/s would round to 0.0) and
    there is no per-method peak memory (n/a; `run_bench_command` prints the run's peak resident set).
    one_device: the hosts took turns in fewer processes (--workers): a column of hosts, not GPUs."""
    table = Table(title="apb bench: prefill" + (" (hosts in turn: times are one device's)" if one_device else ""),
                  title_justify="left")
    gpu = device == "cuda"
    unit, scale, per = ("TFLOP/s", 1.0, "GPU") if gpu else ("GFLOP/s", 1e3, "host")
    hosts = "GPUs" if gpu and not one_device else "hosts"
    for name in ("len", "method", hosts, "prefill s", "tok/s", "vs single", f"eff {unit}", f"exec {unit}/{per}",
                 f"busiest {unit}", "peak GiB", "passing recv", "decode ms/tok", "answer s", "logits Δ vs single"):
        table.add_column(name, justify="left" if name == "method" else "right")
    cite = any(row.get("cite_ms") is not None for row in rows)
    if cite:
        table.add_column("cite ms", justify="right")

    def rate(value: float | None) -> str:
        return _fmt(None if value is None else value * scale, 1)

    for row in rows:
        peaks = [p for p in row["peak_mem_gib"] if p is not None]
        table.add_row(
            _tokens_label(row["len"]), row["method"] + ("" if row["exact"] else "*"), str(row["hosts"]),
            _fmt(row["prefill_s"], 3), _fmt(row["tokens_per_s"], 0), _fmt(row["speedup_vs_single"]),
            rate(row["effective_tflops"]), rate(row["executed_tflops_per_gpu"]),
            rate(row["busiest_host_tflops"]), _fmt(max(peaks) if peaks else None, 1) if gpu else "n/a",
            _fmt(row.get("passing_received")), _fmt(row["decode_ms_per_token"], 1), _fmt(row.get("answer_s"), 3),
            _fmt(row.get("logits_rel_diff_vs_single"), 4),  # absent when single did not run
            *([_fmt(row.get("cite_ms"), 1)] if cite else []),
        )
    table.caption = ("* approximate method; single = rank 0 alone, whole context; eff = exact causal FLOPs / time; "
                     "exec = FLOPs the method runs; passing recv = tokens the last host received; "
                     "answer s = prefill + query + --decode-tokens tokens (per question with --questions); "
                     "logits Δ = ‖logits − single's‖ / ‖single's‖ after the query"
                     + ("; cite ms = folding the citation mass after each answer (in answer s)" if cite else ""))
    return table


def speedup_table(rows: list[dict[str, Any]], key: str = "speedup_vs",
                  title: str = "prefill speedup (row over column)") -> Table:
    """Row method's speedup over column method, per length (ratios of one run's medians)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = Table(title=title, title_justify="left")
    table.add_column("len")
    table.add_column("method", justify="left")
    for m in methods:
        table.add_column(m, justify="right")
    for row in rows:
        cells = ["1" if m == row["method"] else _fmt(row[key].get(m)) for m in methods]
        table.add_row(_tokens_label(row["len"]), row["method"], *cells)
    return table


def projected_table(rows: list[dict[str, Any]]) -> Table | None:
    """With hosts that took turns on one device (--workers 1): the projected H-device prefill per method
    (apb_core.bench.projection), with its parts and the spread of the hosts' own compute; None otherwise."""
    projected = [r for r in rows if r.get("projected")]
    if not projected:
        return None
    table = Table(title="projected prefill on H devices (hosts measured one after another on one)",
                  title_justify="left")
    for name in ("len", "method", "hosts", "measured s", "projected s", "compute s", "all-gather s",
                 "host busy s (min..max)", "projected vs single"):
        table.add_column(name, justify="left" if name == "method" else "right")
    single = {r["len"]: r["projected"]["prefill_s"] for r in projected if r["method"] == "single"}
    for row in projected:
        proj = row["projected"]
        busy = [b for b in proj["host_busy_s"] if b > 0] or [0.0]
        base = single.get(row["len"])
        table.add_row(
            _tokens_label(row["len"]), row["method"] + ("" if row["exact"] else "*"), str(row["hosts"]),
            _fmt(row["prefill_s"], 3), _fmt(proj["prefill_s"], 3), _fmt(proj["compute_s"], 3),
            _fmt(proj["comm_s"], 3), f"{min(busy):.3f}..{max(busy):.3f}",
            _fmt(base / proj["prefill_s"] if base and proj["prefill_s"] else None),
        )
    table.caption = (f"projected = the slowest host of each segment between collectives + all-gathers at "
                     f"{projected[0]['projected']['link_gibps']:g} GiB/s (no latency term); ring and Ulysses need "
                     "one process per host")
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
    ax.set_title(f"apb bench: prefill time, {hosts} hosts (single = 1 GPU)")
    if len(lengths) > 1:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
