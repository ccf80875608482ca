"""Attention that returns its log-sum-exp, on the best kernel torch has for the device.

APB never needs an arbitrary mask: every piece is either dense (no mask) or square causal, and pieces are
merged by log-sum-exp (apb_core.attention.merge_partials). So one primitive suffices:
`attention_with_lse(q, k, v, causal)`. Backends, in order of preference:
- CUDA: cuDNN attention (`_scaled_dot_product_cudnn_attention`, compute_log_sumexp=True; the fastest
  measured on H100/H200), then torch's flash backend (`_scaled_dot_product_flash_attention`).
- CPU: torch's flash kernel for CPU (`_scaled_dot_product_flash_attention_for_cpu`), which returns the LSE.
- Anything else (or an op that refuses a shape): the fp32 math path below.
GQA is handled by repeating K/V heads (counted in the time); causal is top-left aligned, so callers only pass
causal=True for square problems.
"""

from __future__ import annotations

import os

import torch

_FORCE = os.environ.get("APB_ATTN_BACKEND", "")  # "math" forces the plain path (debugging)
SMALL_QUERY = 64  # rows (after GQA grouping) up to which the CPU uses plain matmuls


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _math(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = _expand_kv(q, k, v)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        sq, sk = logits.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.softmax(logits, dim=-1), v.float())
    return out.to(q.dtype), lse


def backend_name(device: torch.device | str) -> str:
    """The backend attention_with_lse uses on this device (reported by bench and info)."""
    if _FORCE:
        return _FORCE
    return "cudnn" if torch.device(device).type == "cuda" else "cpu-flash"


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """out = softmax(q kᵀ·scale [causal, top-left]) v, and lse = logsumexp of the logits per row (fp32).

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D]. Returns out [B, Hq, Sq, D] (q.dtype), lse [B, Hq, Sq] fp32.
    Zero keys give out = 0 and lse = -inf, so such a partial drops out of any merge.
    """
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    if sk == 0 or sq == 0:
        return q.new_zeros(b, hq, sq, v.shape[-1]), q.new_full((b, hq, sq), float("-inf"), dtype=torch.float32)
    if _FORCE == "math":
        return _math(q, k, v, causal, scale)
    groups = hq // k.shape[1]
    if not causal and groups > 1:
        # GQA without copying K/V: the g query heads of each KV head become g·Sq rows of one head.
        out, lse = attention_with_lse(q.reshape(b, k.shape[1], groups * sq, d), k, v, False, scale)
        return out.reshape(b, hq, sq, -1), lse.reshape(b, hq, sq)
    if not causal and sq <= SMALL_QUERY and q.device.type == "cpu":
        return _math(q, k, v, False, scale)  # decode: a GEMV; the flash kernel's tiling only costs here
    ke, ve = _expand_kv(q, k, v)
    if q.device.type == "cuda":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, ke, ve, None, True, 0.0, causal, False, scale=scale
            )[:2]
            return out, lse.view(b, hq, sq).float()
        except RuntimeError:
            pass
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, ke, ve, 0.0, causal, False, scale=scale)[:2]
            return out, lse.float()
        except RuntimeError:
            return _math(q, k, v, causal, scale)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, ke, ve, 0.0, causal, scale=scale)
        return out, lse.float()
    return _math(q, k, v, causal, scale)
