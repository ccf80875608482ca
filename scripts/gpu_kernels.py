"""Correctness and speed of the attention kernels on one GPU (run on the device machine, see gpu_bench.sh).

1. correctness: attention_with_lse (cuDNN) against the fp32 reference on bf16 inputs, GQA included, and the
   APB mask (three-call split and one padded causal call) against the dense fp32 reference;
2. speed: the APB-mask attention of the busiest host at 128K over 2 hosts (anchor 8K, passing 8K, block 64K,
   32 q / 8 kv heads, d = 128) in several variants, each checked against the split variant, plus the
   primitive calls it is made of. "useful TFLOP/s" = 4·Hq·d·(pairs the APB mask allows) / time.

`--small` runs every step on small shapes (also on CPU) to check the script itself. Writes a JSON of all
numbers to --out and prints a compact table last.
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

from apb_core.algorithm.attention import apb_attention, apb_attention_reference  # noqa: E402
from apb_core.algorithm.flops import apb_pairs  # noqa: E402
from kernels import attention_with_lse, reference_attention, sdpa_lse  # noqa: E402


# The whole APB mask as ONE square causal call, by padding the query with one dummy row per passing key
# (keys reordered [anchor | passing | local]). Measured on an H100 (2026-11-22) at the 2-host 128K shape: 91.7 ms
# against 89.6 ms for the engine's three-call split, so the engine keeps the split; this script keeps the
# alternative so the comparison can be repeated on new hardware.
def padded_waste(anchor_len: int, passing_len: int, local_len: int) -> float:
    """Extra pairs of the padded call over the useful pairs (0 when there is no passing block)."""
    useful = apb_pairs(anchor_len, passing_len, local_len)
    extra = passing_len * anchor_len + passing_len * (passing_len + 1) // 2
    return extra / max(useful, 1)


def padded_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    anchor_len: int,
    k_pass: torch.Tensor | None,
    v_pass: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """APB-mask attention in one causal call; same contract as apb_core.attention.apb_attention.

    q: [B, Hq, a + n, D]; k, v: [B, Hkv, a + n, D]; k_pass, v_pass: [B, Hkv, P, D] or None.
    Returns out [B, Hq, a + n, D].
    """
    a = anchor_len
    p = 0 if k_pass is None else k_pass.shape[2]
    if p == 0:  # no passing: [anchor | local] under plain causal attention is already the mask
        out, _ = attention_with_lse(q, k, v, causal=True, scale=scale)
        return out
    b, hq, s, d = q.shape
    q_pad = q.new_empty(b, hq, s + p, d)
    q_pad[:, :, :a] = q[:, :, :a]
    q_pad[:, :, a : a + p] = 0
    q_pad[:, :, a + p :] = q[:, :, a:]
    k_pad = torch.cat([k[:, :, :a], k_pass, k[:, :, a:]], dim=2)
    v_pad = torch.cat([v[:, :, :a], v_pass, v[:, :, a:]], dim=2)
    out, _ = attention_with_lse(q_pad, k_pad, v_pad, causal=True, scale=scale)
    if a == 0:
        return out[:, :, p:]
    return torch.cat([out[:, :, :a], out[:, :, a + p :]], dim=2)




def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def bench(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds of fn() (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def correctness(device, dtype, small: bool) -> list[dict]:
    out = []
    g = torch.Generator(device=device).manual_seed(1)
    d = 128 if not small else 32
    n = 2048 if not small else 96
    for hq, hkv, sq, sk, causal in [(32, 8, n, n, True), (32, 8, n, n, False), (32, 8, n // 2, n + 333, False),
                                    (32, 32, n, n, True), (40, 8, n - 5, n - 5, True)]:
        q = torch.randn(1, hq, sq, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, hkv, sk, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(1, hkv, sk, d, device=device, dtype=dtype, generator=g)
        mask = torch.ones(sq, sk, dtype=torch.bool, device=device).tril() if causal else None
        fast, lse = attention_with_lse(q, k, v, causal=causal, scale=d**-0.5)
        ref, ref_lse = reference_attention(q.float(), k.float(), v.float(), mask, d**-0.5)
        out.append({"check": f"attention_with_lse hq={hq} hkv={hkv} sq={sq} sk={sk} causal={causal}",
                    "rel_err": rel(fast, ref), "lse_max_abs_err": (lse - ref_lse).abs().max().item(),
                    "finite": bool(torch.isfinite(fast).all())})
    a, p, n_loc = (256, 384, 1500) if not small else (16, 24, 60)
    for name, fn in (("apb split (3 calls + merge)", apb_attention), ("apb padded (1 causal call)",
                                                                       padded_causal_attention)):
        q = torch.randn(1, 32, a + n_loc, d, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, 8, a + n_loc, d, device=device, dtype=dtype, generator=g)
        v = torch.randn(1, 8, a + n_loc, d, device=device, dtype=dtype, generator=g)
        kp = torch.randn(1, 8, p, d, device=device, dtype=dtype, generator=g)
        vp = torch.randn(1, 8, p, d, device=device, dtype=dtype, generator=g)
        fast = fn(q, k, v, a, kp, vp, d**-0.5)
        ref = apb_attention_reference(q.float(), k.float(), v.float(), a, kp.float(), vp.float(), d**-0.5)
        out.append({"check": name, "rel_err": rel(fast, ref), "lse_max_abs_err": None,
                    "finite": bool(torch.isfinite(fast).all())})
    return out


def flex_variant(q, k, v, kp, vp, a: int, scale: float):
    """The APB mask as one flex_attention call with a block mask over keys [passing | anchor | local]."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    p = kp.shape[2]
    keys, values = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)

    def mask_mod(b, h, q_idx, kv_idx):
        anchor_row = q_idx < a
        anchor_ok = (kv_idx >= p) & (kv_idx - p <= q_idx)
        local_ok = kv_idx <= q_idx + p
        return torch.where(anchor_row, anchor_ok, local_ok)

    block_mask = create_block_mask(mask_mod, None, None, q.shape[2], keys.shape[2], device=q.device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run():
        return compiled(q, keys, values, block_mask=block_mask, scale=scale, enable_gqa=True)

    return run


def speed(device, dtype, small: bool) -> tuple[list[dict], dict, tuple]:
    k1 = 1024 if not small else 8
    a, p, n_loc, probe, hq, hkv, d = 8 * k1, 8 * k1, 64 * k1, 24, 32, 8, 128
    if small:
        d = 32
    g = torch.Generator(device=device).manual_seed(2)
    s = a + n_loc + probe
    q = torch.randn(1, hq, s, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, hkv, s, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, hkv, s, d, device=device, dtype=dtype, generator=g)
    kp = torch.randn(1, hkv, p, d, device=device, dtype=dtype, generator=g)
    vp = torch.randn(1, hkv, p, d, device=device, dtype=dtype, generator=g)
    scale = d**-0.5
    useful = 4.0 * hq * d * apb_pairs(a, p, n_loc + probe)
    gqa_key = (str(q.device), dtype, d)
    native = sdpa_lse.native_gqa_ok(q.device, dtype, d) if q.is_cuda else False
    rows = []
    reference = apb_attention(q, k, v, a, kp, vp, scale)

    def variant(name, fn, flops=useful, check=True):
        try:
            seconds = bench(fn)
            err = rel(fn(), reference) if check else None
            rows.append({"variant": name, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "rel_vs_split": err})
        except Exception as exc:  # one variant failing must not lose the others' numbers
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})

    def forced_expand(fn):
        def run():
            saved = sdpa_lse._NATIVE_GQA.get(gqa_key)
            sdpa_lse._NATIVE_GQA[gqa_key] = False
            try:
                return fn()
            finally:
                if saved is None:
                    sdpa_lse._NATIVE_GQA.pop(gqa_key, None)
                else:
                    sdpa_lse._NATIVE_GQA[gqa_key] = saved
        return run

    split = lambda: apb_attention(q, k, v, a, kp, vp, scale)  # noqa: E731
    padded = lambda: padded_causal_attention(q, k, v, a, kp, vp, scale)  # noqa: E731
    variant("split: 3 calls + LSE merge (GQA native)" if native else "split: 3 calls + LSE merge", split)
    if native:
        variant("split, GQA by repeat_interleave", forced_expand(split))
    variant("padded: 1 causal call (GQA native)" if native else "padded: 1 causal call", padded)
    if native:
        variant("padded, GQA by repeat_interleave", forced_expand(padded))
    # the primitives the variants are made of
    nloc = n_loc + probe
    qs, ks, vs = q[:, :, a:], k[:, :, a:], v[:, :, a:]
    prefix_k, prefix_v = torch.cat([kp, k[:, :, :a]], 2), torch.cat([vp, v[:, :, :a]], 2)
    variant(f"primitive: causal {nloc} square", lambda: attention_with_lse(qs, ks, vs, True, scale),
            4.0 * hq * d * nloc * (nloc + 1) / 2, check=False)
    variant(f"primitive: dense {nloc} x {p + a}", lambda: attention_with_lse(qs, prefix_k, prefix_v, False, scale),
            4.0 * hq * d * nloc * (p + a), check=False)
    big = 2 * n_loc  # the one-GPU full prefill's attention at 128K
    qf = torch.randn(1, hq, big, d, device=device, dtype=dtype, generator=g)
    kf = torch.randn(1, hkv, big, d, device=device, dtype=dtype, generator=g)
    vf = torch.randn(1, hkv, big, d, device=device, dtype=dtype, generator=g)
    variant(f"primitive: causal {big} square (1-GPU full)", lambda: attention_with_lse(qf, kf, vf, True, scale),
            4.0 * hq * d * big * (big + 1) / 2, check=False)
    info = {"shape": {"anchor": a, "passing": p, "local": n_loc, "probe": probe, "q_heads": hq, "kv_heads": hkv,
                      "head_dim": d}, "useful_tflop": useful / 1e12, "native_gqa": native}
    return rows, info, (q, k, v, kp, vp, a, scale, useful, reference)


def flex(inputs: tuple) -> dict:
    """The flex_attention variant (compiled: slow to start, so it runs last, after the JSON is written)."""
    q, k, v, kp, vp, a, scale, useful, reference = inputs
    try:
        t0 = time.perf_counter()
        run = flex_variant(q, k, v, kp, vp, a, scale)
        run()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        seconds = bench(run)
        return {"variant": f"flex_attention block mask (start {compile_s:.0f} s)", "ms": seconds * 1e3,
                "tflops": useful / seconds / 1e12, "rel_vs_split": rel(run(), reference)}
    except Exception as exc:
        return {"variant": "flex_attention block mask", "error": f"{type(exc).__name__}: {exc}"[:200]}


def matmul_ceiling(device, dtype, small: bool) -> float | None:
    if not torch.cuda.is_available():
        return None
    n = 8192 if not small else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / bench(lambda: a @ b) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", default="kernels.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}
    checks = correctness(device, dtype, args.small)
    rows, info, inputs = speed(device, dtype, args.small)
    ceiling = matmul_ceiling(device, dtype, args.small)
    result = {"env": env, "checks": checks, "speed": rows, "info": info, "bf16_matmul_tflops": ceiling}
    Path(args.out).write_text(json.dumps(result, indent=1))
    if not args.no_flex and device.type == "cuda":
        rows.append(flex(inputs))
        Path(args.out).write_text(json.dumps(result, indent=1))
    report(result)


def report(result: dict) -> None:
    env, checks, rows, info, ceiling = (result[k] for k in ("env", "checks", "speed", "info", "bf16_matmul_tflops"))
    print(f"env: {env}  native GQA in cuDNN: {info['native_gqa']}  8192^3 bf16 matmul: "
          f"{ceiling if ceiling is None else round(ceiling)} TFLOP/s")
    print("correctness (bf16 vs fp32 reference: rel = ||out-ref||/||ref||):")
    for c in checks:
        lse = "" if c["lse_max_abs_err"] is None else f"  lse max abs {c['lse_max_abs_err']:.2e}"
        print(f"  {c['check']:<62} rel {c['rel_err']:.2e}{lse}  finite={c['finite']}")
    shape = info["shape"]
    print(f"APB mask speed: anchor {shape['anchor']}, passing {shape['passing']}, block {shape['local']}"
          f"+{shape['probe']}, {shape['q_heads']}/{shape['kv_heads']} heads, d={shape['head_dim']}; "
          f"useful {info['useful_tflop']:.1f} TFLOP per call")
    for r in rows:
        if "error" in r:
            print(f"  {r['variant']:<52} ERROR {r['error']}")
        else:
            err = "" if r["rel_vs_split"] is None else f"  rel vs split {r['rel_vs_split']:.1e}"
            print(f"  {r['variant']:<52} {r['ms']:9.2f} ms  {r['tflops']:6.1f} TFLOP/s{err}")


if __name__ == "__main__":
    main()
