"""Where the decode step's small kernels go, and what fusing the RMSNorms buys (one GPU, random weights).

For each variant (`hf`: transformers' RMSNorm modules, 7-8 elementwise kernels each; `fused`: the same norms
through torch's rms_norm op; `compiled`: every decoder layer through torch.compile, attention left eager),
prefills `--len` tokens, decodes `--tokens` tokens with the CUDA-graph step and
prints ms/token (median), the logits' max relative difference from `hf`, and a kernel census of one eager
static step (kernels per step, the most frequent names). Usage on the device machine:
`python scripts/gpu_decode_fusion.py --preset llama-3.1-8b --len 32k --tokens 64`.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apb_cli.options import parse_tokens  # noqa: E402
from apb_core.runtime.engine import HostEngine  # noqa: E402
from scripts.gpu_decode import random_setup, run  # noqa: E402

# classes whose forward is weight * (x_fp32 * rsqrt(mean(x_fp32²) + eps)).to(x.dtype) (Gemma's 1 + weight is not)
FUSABLE = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"})


def _fused_forward(module: torch.nn.Module):
    weight, eps = module.weight, module.variance_epsilon
    shape = (weight.shape[-1],)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return weight * F.rms_norm(hidden, shape, None, eps)  # computes in fp32, returns hidden's dtype

    return forward


def fuse_norms(model: torch.nn.Module) -> int:
    """Give every fusable RMSNorm of `model` the fused forward (an instance attribute: `unfuse_norms` undoes
    it). Returns how many modules changed."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in FUSABLE and "forward" not in vars(module):
            module.forward = _fused_forward(module)
            count += 1
    return count


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile every decoder layer (inductor, static shapes); the attention hook stays eager (a graph break),
    so each layer becomes two fused graphs: norm + projections + RoPE, and o_proj + residual + norm + MLP."""
    from transformers import AttentionInterface

    from apb_core.runtime.engine import ATTN_NAME, apb_attention_hook

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    AttentionInterface.register(ATTN_NAME, torch.compiler.disable(apb_attention_hook))
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)
    return len(model.model.layers)


def unfuse_norms(model: torch.nn.Module) -> int:
    """Back to the modules' own forward. Returns how many modules changed."""
    count = 0
    for module in model.modules():
        if "forward" in vars(module):
            del module.forward
            count += 1
    return count


def census(model, ctx: list[int], query: list[int]) -> dict:
    engine = HostEngine(model, decode="static")
    run(engine, ctx, query, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.step_token(query[0], len(ctx) + len(query) + 4)
        torch.cuda.synchronize()
    engine.release()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: collections.Counter = collections.Counter()
    time_by: collections.Counter = collections.Counter()
    for e in kernels:
        by_name[e.name[:80]] += 1
        time_by[e.name[:80]] += e.device_time_total
    return {"kernels": len(kernels), "kernel_us": round(sum(time_by.values()), 1),
            "top": [(n, c, round(time_by[n], 1)) for n, c in by_name.most_common(12)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--len", default="32k")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default="hf,fused,compiled", help="hf, fused (norms), compiled (layers); hf first")
    args = ap.parse_args()
    n = parse_tokens(args.len)[0]
    device, model, ctx, query = random_setup(args.preset, n)
    results, ref = {}, None
    for variant in args.variants.split(","):
        fused = fuse_norms(model) if variant == "fused" else compile_layers(model) if variant == "compiled" else 0
        t0 = time.perf_counter()
        mode = "graph" if device.type == "cuda" else "static"
        engine = HostEngine(model, decode=mode)
        seen, toks, ms = run(engine, ctx, query, args.tokens)
        engine.release()
        ref = ref or (seen, toks)
        agree = next((i for i, (a, b) in enumerate(zip(toks, ref[1], strict=False)) if a != b), len(toks))
        rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(seen[: agree + 1], ref[0][: agree + 1],
                                                                      strict=False))
        row = {"variant": variant, "changed": fused, "wall_s": round(time.perf_counter() - t0, 1),
               "ms_per_token": round(ms, 3), "max_rel_logits_vs_hf": rel,
               "tokens_equal_hf": toks == ref[1]}
        if device.type == "cuda":
            row["census"] = census(model, ctx, query)
            torch.cuda.empty_cache()
        results[variant] = row
        print(json.dumps(row), flush=True)
        unfuse_norms(model)
    if args.out:
        Path(args.out).write_text(json.dumps({"preset": args.preset, "len": n, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
