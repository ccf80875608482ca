"""Decode on one GPU: the CUDA-graph step against the eager one, token by token, on a real model shape.

Prefills a random-weight model (bf16) with `--len` tokens, then decodes `--tokens` greedy tokens three times
(eager, static, graph), recording the logits the model produced before each token; prints the max relative
difference of each mode from eager, whether the tokens agree, and ms per token (median, device-synchronised).
Run on the device machine: `python scripts/gpu_decode.py --preset llama-3.1-8b --len 8k --tokens 32`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apb_cli.options import parse_tokens  # noqa: E402
from apb_core import models  # noqa: E402
from apb_core.algorithm.layout import HostPlan  # noqa: E402
from apb_core.runtime.engine import HostEngine, register_attention  # noqa: E402
from apb_core.runtime.generate import decode  # noqa: E402


def run(engine: HostEngine, ctx: list[int], query: list[int], tokens: int,
        ) -> tuple[list[torch.Tensor], list[int], float]:
    plan = HostPlan(0, 1, 0, len(ctx))
    engine.prefill(plan, ctx, reserve=len(query) + tokens + 16)  # room for the profiled steps after it
    seen: list[torch.Tensor] = []

    def choose(logits: torch.Tensor) -> int:
        seen.append(logits.detach().float().cpu())
        return int(logits.argmax())

    out = decode(engine, query, len(ctx), tokens, choose)
    return seen, out.tokens, statistics.median(out.token_s) * 1e3


def random_setup(preset: str, n: int) -> tuple[torch.device, torch.nn.Module, list[int], list[int]]:
    """A random-weight model of `preset` (bf16 on the GPU, fp32 on CPU, where it only checks the script), n
    context token ids and 32 query ids drawn away from the special tokens."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = "bf16" if device.type == "cuda" else "fp32"
    model = models.build_random_model(preset, device, dtype, attn_implementation=register_attention())
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    low, high = min(100, vocab // 4), max(vocab - 300, vocab // 2)
    ctx = torch.randint(low, high, (n,), generator=g).tolist()
    query = torch.randint(low, high, (32,), generator=g).tolist()
    return device, model, ctx, query


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--len", default="8k")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = parse_tokens(args.len)[0]
    device, model, ctx, query = random_setup(args.preset, n)
    results = {}
    for mode in ("eager", "static", "graph") if device.type == "cuda" else ("eager", "static"):
        engine = HostEngine(model, decode=mode)
        t0 = time.perf_counter()
        seen, toks, ms = run(engine, ctx, query, args.tokens)
        results[mode] = (seen, toks, ms, time.perf_counter() - t0)
        engine.release()
        torch.cuda.empty_cache()
    if device.type == "cuda":  # where the time of one step goes, kernel by kernel (no launch gaps in these sums)
        engine = HostEngine(model, decode="static")
        run(engine, ctx, query, 4)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                engine.step_token(query[i], len(ctx) + len(query) + 4 + i)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
        engine.release()
    ref, ref_toks, *_ = results["eager"]
    rows = []
    for mode, (seen, toks, ms, wall) in results.items():
        # compare while the tokens agree (after a flip the contexts differ)
        agree = next((i for i, (a, b) in enumerate(zip(toks, ref_toks, strict=False)) if a != b), len(toks))
        rel = max(((a - b).norm() / b.norm()).nan_to_num(float("inf")).item()
                  for a, b in zip(seen[: agree + 1], ref[: agree + 1], strict=False))
        rows.append({"mode": mode, "ms_per_token": ms, "max_rel_logits_vs_eager": rel,
                     "tokens_equal_eager": toks == ref_toks, "first_difference": agree, "wall_s": wall})
        print(f"{mode:>6}: {ms:7.2f} ms/token, max rel logits diff vs eager {rel:.2e}, tokens equal {toks == ref_toks} "
              f"(first difference at {agree}), wall {wall:.1f} s")
    if args.out:
        name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
        Path(args.out).write_text(json.dumps({"preset": args.preset, "len": n, "tokens": args.tokens, "device": name,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
