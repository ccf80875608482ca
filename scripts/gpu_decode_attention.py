"""Decode attention on the GPU: one query row per head over a long cache, every layer its own K/V (no L2 reuse),
timed inside one CUDA graph per variant. Compares ways to call the kernel for GQA (Hq = G * Hkv):

- rows:   flash varlen with one query row per query head (what kernels.DecodeAttention does today);
- packed: flash varlen with the G query heads of each KV head as G query rows of one head (each K/V tile is
          read once for its G heads);
- matmul: bf16 matrix products with the G heads as rows, softmax in fp32.

Prints ms per decode step (all layers) and the effective K+V read bandwidth, and the largest differences from
the fp32 reference on the first layer. Usage: python scripts/gpu_decode_attention.py [--lens 16384,65536,131072]
"""

from __future__ import annotations

import argparse
import json

import torch


def rows(q, k, v, used, scale, cu_q, cu_k):
    hq, d = q.shape[1], q.shape[3]
    n = k.shape[2]
    out, lse = torch.ops.aten._flash_attention_forward(
        q.reshape(1, hq, d), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_q, cu_k, 1, n, 0.0, False, False,
        scale=scale, seqused_k=used)[:2]
    return out.reshape(1, hq, 1, d), lse.float().reshape(1, hq, 1)


def packed(q, k, v, used, scale, cu_q, cu_k):
    hq, d = q.shape[1], q.shape[3]
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    qp = q.reshape(hkv, g, d).transpose(0, 1)  # [G, Hkv, D]: G rows of each KV head
    out, lse = torch.ops.aten._flash_attention_forward(
        qp, k[0].transpose(0, 1), v[0].transpose(0, 1), cu_q, cu_k, g, n, 0.0, False, False,
        scale=scale, seqused_k=used)[:2]
    # out [G, Hkv, D]; lse [Hkv, G]
    return out.transpose(0, 1).reshape(1, hq, 1, d), lse.float().reshape(1, hq, 1)


def matmul(q, k, v, used, scale, cu_q, cu_k):
    hq, d = q.shape[1], q.shape[3]
    hkv, n = k.shape[1], k.shape[2]
    qg = q.reshape(1, hkv, hq // hkv, d)
    logits = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [1, Hkv, G, N]
    valid = torch.arange(n, device=q.device) < used
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = torch.matmul(torch.exp(logits - lse).to(v.dtype), v)
    return out.reshape(1, hq, 1, d), lse.reshape(1, hq, 1)


def reference(q, k, v, scale):
    hq, hkv = q.shape[1], k.shape[1]
    kf = k.float().repeat_interleave(hq // hkv, dim=1)
    vf = v.float().repeat_interleave(hq // hkv, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), kf) * scale
    lse = torch.logsumexp(logits, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(logits, -1), vf), lse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="16384,65536,131072")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    scale = args.dim ** -0.5
    results = []
    for n in (int(x) for x in args.lens.split(",")):
        g = torch.Generator(device=dev).manual_seed(0)
        ks = [torch.randn(1, args.hkv, n, args.dim, device=dev, dtype=dt, generator=g) for _ in range(args.layers)]
        vs = [torch.randn(1, args.hkv, n, args.dim, device=dev, dtype=dt, generator=g) for _ in range(args.layers)]
        q = torch.randn(1, args.hq, 1, args.dim, device=dev, dtype=dt, generator=g) * 2
        used = torch.tensor([n], dtype=torch.int32, device=dev)
        ref_out, ref_lse = reference(q, ks[0], vs[0], scale)
        kv_bytes = 2 * args.layers * ks[0].numel() * ks[0].element_size()
        for name, fn in (("rows", rows), ("packed", packed), ("matmul", matmul)):
            gq = args.hq // args.hkv if name == "packed" else 1
            cu_q = torch.tensor([0, gq], dtype=torch.int32, device=dev)
            cu_k = torch.tensor([0, n], dtype=torch.int32, device=dev)
            try:
                out, lse = fn(q, ks[0], vs[0], used, scale, cu_q, cu_k)
                err = (out.float() - ref_out).abs().max().item()
                lse_err = (lse - ref_lse).abs().max().item()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        for k, v in zip(ks, vs, strict=True):
                            fn(q, k, v, used, scale, cu_q, cu_k)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for k, v in zip(ks, vs, strict=True):
                        fn(q, k, v, used, scale, cu_q, cu_k)
                graph.replay()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.reps):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / args.reps
                row = {"len": n, "variant": name, "ms_per_step": round(ms, 3),
                       "kv_gib_per_s": round(kv_bytes / ms * 1e3 / 2**30, 1),
                       "max_abs_err": err, "lse_max_abs_err": lse_err}
                del graph
            except RuntimeError as exc:
                row = {"len": n, "variant": name, "error": str(exc).splitlines()[0][:200]}
            results.append(row)
            print(json.dumps(row), flush=True)
        del ks, vs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
