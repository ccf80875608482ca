"""`apb bench`'s rows: one JSON-ready row per method and length from every host's runs, with FLOPs (the model in
apb_core.algorithm.flops), speedups and how far each method's logits are from the exact one-host reference."""

from __future__ import annotations

import statistics
from typing import Any

from apb_core.algorithm.flops import ModelDims
from apb_core.bench.host import BenchJob, HostRun
from apb_core.bench.projection import PROJECTED_LINK_GIBPS, project

EXACT_METHODS = ("hf", "single", "ring", "ulysses", "full")
REFERENCE = "single"  # exact attention on one host: the speed and logits every method is compared with


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _compare_with_reference(rows: list[dict[str, Any]], lead_runs: list[HostRun], methods: list[str]) -> None:
    """How far each method's logits after the query phase are from REFERENCE's (rank 0 holds every method's)."""
    if REFERENCE not in methods:
        return
    ref_run = lead_runs[methods.index(REFERENCE)]
    if ref_run.logits is None:
        return
    ref = ref_run.logits.float()
    for row, run in zip(rows, lead_runs, strict=True):
        if run.logits is None:
            continue
        diff = run.logits.float() - ref
        row[f"logits_max_abs_diff_vs_{REFERENCE}"] = diff.abs().max().item()
        row[f"logits_rel_diff_vs_{REFERENCE}"] = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
        row[f"same_tokens_as_{REFERENCE}"] = run.generated == ref_run.generated


def _projected(prefills: list[list], link_gibps: float, one_answer_s: float | None,
               measured_s: float | None) -> dict[str, Any]:
    """The projected H-device prefill (median over the timed runs, the run whose projection is the median)."""
    runs = sorted((project(ops, link_gibps) for ops in prefills), key=lambda p: p.prefill_s)
    mid = runs[(len(runs) - 1) // 2]
    return {
        "prefill_s": mid.prefill_s,
        "compute_s": mid.compute_s,
        "comm_s": mid.comm_s,
        "host_busy_s": mid.host_busy_s,
        "link_gibps": link_gibps,
        "note": "projected: the slowest host of each segment between collectives plus the all-gathers at "
                f"{link_gibps:g} GiB/s, from hosts that took turns on one device (apb_core.bench.projection)",
    }


def summarise(job: BenchJob, per_host: list[list[HostRun]], dims: ModelDims,
              link_gibps: float = PROJECTED_LINK_GIBPS) -> list[dict[str, Any]]:
    """One JSON-ready row per method from every host's runs at one length (with `projected` when the hosts took
    turns in one process: apb_core.bench.projection, at `link_gibps`)."""
    rows = []
    exact = dims.exact_flops(job.length)
    for m, method in enumerate(job.methods):
        runs = [host_runs[m] for host_runs in per_host]
        active = [r for r in runs if r.participated]
        lead = runs[0]
        seconds = _median(lead.prefill_s)
        executed = [dims.linear_flops_per_token * r.tokens + dims.attention_flops_per_pair * r.pairs for r in active]
        gpus = len(active)
        critical = active[-1]  # the last host: it holds the query and, for APB/Star, the most work
        token_s = _median(lead.token_s) if lead.token_s else None
        cite_s = _median(lead.cite_s) if lead.cite_s else 0.0  # --cite: per answer, after its last token
        answer_s = one_answer_s = None
        queries_s = lead.question_query_s if method != "hf" else [0.0]  # hf: one question, its query in prefill
        questions = max(len(queries_s), 1)
        if seconds is not None and token_s is not None:  # what a user waits for: prefill, query, the answer
            one_answer_s = seconds + (queries_s[0] if queries_s else 0.0) + job.decode_tokens * token_s + cite_s
            # bench --questions N: every question's query and answer over the one prefill
            answer_s = seconds + sum(queries_s) + questions * (job.decode_tokens * token_s + cite_s)
        row: dict[str, Any] = {
            "method": method,
            "len": job.length,
            "hosts": gpus,
            "exact": method in EXACT_METHODS or critical.auto_exact,
            "auto_exact": critical.auto_exact,
            "prefill_s": seconds,
            "prefill_runs_s": lead.prefill_s,
            "warmup_s": lead.warmup_s,
            "host_prefill_s": [_median(r.host_prefill_s) for r in active],
            "tokens_per_s": job.length / seconds if seconds else None,
            "exact_pflop": exact / 1e15,
            "executed_pflop": sum(executed) / 1e15,
            "busiest_host_pflop": max(executed) / 1e15,
            "host_pflop": [x / 1e15 for x in executed],  # per host (FLOP model)
            "effective_tflops": exact / seconds / 1e12 if seconds else None,
            "executed_tflops": sum(executed) / seconds / 1e12 if seconds else None,
            "executed_tflops_per_gpu": sum(executed) / seconds / 1e12 / gpus if seconds else None,
            "busiest_host_tflops": max(executed) / seconds / 1e12 if seconds else None,
            "peak_mem_gib": [None if r.peak_bytes is None else r.peak_bytes / 2**30 for r in active],
            "query_ms": lead.query_s * 1e3 if lead.participated and method != "hf" else None,
            "decode_ms_per_token": token_s * 1e3 if token_s is not None else None,
            "cite_ms": cite_s * 1e3 if lead.cite_s else None,  # --cite: folding the mass after each answer
            "answer_s": answer_s,
            "questions": questions,
            "one_answer_s": one_answer_s,  # the first question alone: prefill, its query, its answer
            "questions_vs_one": answer_s / one_answer_s if answer_s and one_answer_s else None,
            "generated": list(lead.generated),
            "anchor_len": critical.anchor_len,
            "passing_len": critical.passing_len,
            "passing_received": critical.passing_received,
            "block_len": [r.block_len for r in active],
        }
        if lead.prefill_ops:
            row["projected"] = _projected(lead.prefill_ops, link_gibps, one_answer_s, seconds)
        with_breakdown = [r for r in active if r.breakdown]
        if with_breakdown:
            row["breakdown_ms"] = {str(r.rank): {k: v * 1e3 for k, v in r.breakdown.items()} for r in with_breakdown}
            last = with_breakdown[-1].breakdown
            row["breakdown_rank"] = with_breakdown[-1].rank
            if "all-gather" in last:
                row["all_gather_share"] = last["all-gather"] / last["total"]
        rows.append(row)
    _compare_with_reference(rows, [host_runs for host_runs in per_host[0]], job.methods)
    for key, out in (("prefill_s", "speedup_vs"), ("answer_s", "answer_speedup_vs")):
        by_method = {row["method"]: row[key] for row in rows}
        for row in rows:
            mine = row[key]
            row[out] = {m: (t / mine if t and mine else None) for m, t in by_method.items() if m != row["method"]}
    for row in rows:
        row[f"speedup_vs_{REFERENCE}"] = row["speedup_vs"].get(REFERENCE)
    return rows

