"""Attention that returns its log-sum-exp, on the best kernel torch has for the device.

APB never needs an arbitrary mask: every piece is either dense (no mask) or square causal, and pieces are
merged by log-sum-exp (apb_core.attention.merge_partials). So one primitive suffices:
`attention_with_lse(q, k, v, causal)`. Backends, in order of preference:
- CUDA: cuDNN attention (`_scaled_dot_product_cudnn_attention`, compute_log_sumexp=True; the fastest
  measured on H100/H200), then torch's flash backend (`_scaled_dot_product_flash_attention`).
  Few query rows (decode, the query phase) go to the flash backend first: cuDNN builds an execution plan
  for every new key length, i.e. for every generated token (decode measured 113 ms/token at 32K on an H100
  that way), while flash takes any length and splits long caches over the multiprocessors itself.
- CPU: torch's flash kernel for CPU (`_scaled_dot_product_flash_attention_for_cpu`), which returns the LSE.
- Anything else (or an op that refuses a shape): the fp32 math path below.
GQA: cuDNN reads grouped K/V heads itself; whether this torch build lets it is checked once per
(device, dtype, head_dim) against the expanded call on a small probe, so a build that refuses or gets it
wrong falls back to repeating K/V heads (a copy of K/V, counted in the time). Other backends repeat.
Causal is top-left aligned, so callers only pass causal=True for square problems.
"""

from __future__ import annotations

import torch

SMALL_QUERY = 64  # CPU: rows (after GQA grouping) up to which plain matmuls beat the flash kernel
_NATIVE_GQA: dict[tuple, bool] = {}  # (device, dtype, head_dim) -> cuDNN handles Hkv < Hq correctly
CUDA_FEW_ROWS = 128  # CUDA: query rows up to which the flash backend is used (no per-length cuDNN plan)
_FLASH_OK: dict[tuple, bool] = {}  # (device, dtype, head_dim) -> flash takes grouped K/V and is right


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _math(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain matmuls in fp32, one pass over the logits for both the softmax and its LSE (decode's GEMV path)."""
    k, v = _expand_kv(q, k, v)
    logits = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))  # [B, H, Sq, Sk]
    if causal:
        sq, sk = logits.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    peak = logits.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)  # finite: no inf - inf
    probs = logits.sub_(peak).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    out = torch.matmul(probs, v.float()) / total.clamp_min(torch.finfo(torch.float32).tiny)
    lse = (peak + total.log()).squeeze(-1)  # -inf where a row saw no key (total = 0)
    return out.to(q.dtype), lse


def backend_name(device: torch.device | str) -> str:
    """The backend attention_with_lse uses on this device (reported by bench and info)."""
    return "cudnn" if torch.device(device).type == "cuda" else "cpu-flash"


def _cudnn(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, sq, _ = q.shape
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )[:2]
    return out, lse.reshape(b, hq, sq).float()


def _close(out: torch.Tensor, lse: torch.Tensor, ref: torch.Tensor, ref_lse: torch.Tensor) -> bool:
    """A probe's verdict: within 1e-2 of the reference (bf16 rounding is ~1e-3; a wrong head mapping, h % Hkv
    instead of h // g, or a wrong key range is off by O(1))."""
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    return bool(err <= 1e-2 and (lse - ref_lse).abs().max() <= 1e-2)


def native_gqa_ok(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether cuDNN takes un-repeated K/V heads here and gives the expanded call's answer (checked once)."""
    key = (str(device), dtype, head_dim)
    if key not in _NATIVE_GQA:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(1, 8, 96, head_dim, device=device, dtype=dtype, generator=g)
            k = torch.randn(1, 2, 96, head_dim, device=device, dtype=dtype, generator=g)
            v = torch.randn(1, 2, 96, head_dim, device=device, dtype=dtype, generator=g)
            for causal in (False, True):
                out, lse = _cudnn(q, k, v, causal, head_dim**-0.5)
                ke, ve = _expand_kv(q, k, v)
                ref, ref_lse = _cudnn(q, ke, ve, causal, head_dim**-0.5)
                ok = _close(out, lse, ref, ref_lse)
                if not ok:
                    break
        except RuntimeError:
            ok = False
        _NATIVE_GQA[key] = ok
    return _NATIVE_GQA[key]


def _flash(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse.reshape(q.shape[:3]).float()


def flash_few_rows_ok(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the flash backend takes un-repeated K/V heads here and matches the fp32 math path (checked
    once on a small probe, dense and square causal)."""
    key = (str(device), dtype, head_dim)
    if key not in _FLASH_OK:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            for sq, sk, causal in ((1, 300, False), (3, 300, False), (7, 7, True)):
                q = torch.randn(1, 8, sq, head_dim, device=device, dtype=dtype, generator=g)
                k = torch.randn(1, 2, sk, head_dim, device=device, dtype=dtype, generator=g)
                v = torch.randn(1, 2, sk, head_dim, device=device, dtype=dtype, generator=g)
                out, lse = _flash(q, k, v, causal, head_dim**-0.5)
                ref, ref_lse = _math(q, k, v, causal, head_dim**-0.5)
                if out.shape != ref.shape:
                    ok = False
                    break
                ok = _close(out, lse, ref, ref_lse)
                if not ok:
                    break
        except RuntimeError:
            ok = False
        _FLASH_OK[key] = ok
    return _FLASH_OK[key]


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
    if q.device.type == "cuda":
        # flash's causal is bottom-right aligned: the same as ours only for square problems
        few_rows = sq <= CUDA_FEW_ROWS and (not causal or sq == sk)
        if few_rows and flash_few_rows_ok(q.device, q.dtype, d):
            try:
                return _flash(q, k, v, causal, scale)
            except RuntimeError:
                pass
        try:
            if k.shape[1] != hq and native_gqa_ok(q.device, q.dtype, d):
                return _cudnn(q, k, v, causal, scale)
            ke, ve = _expand_kv(q, k, v)
            return _cudnn(q, ke, ve, causal, scale)
        except RuntimeError:
            pass
        ke, ve = _expand_kv(q, k, v)
        try:
            flash = torch.ops.aten._scaled_dot_product_flash_attention
            out, lse = flash(q, ke, ve, 0.0, causal, False, scale=scale)[:2]
            return out, lse.float()
        except RuntimeError:
            return _math(q, k, v, causal, scale)
    groups = hq // k.shape[1]
    if q.device.type == "cpu" and not causal and groups > 1:
        # GQA without copying K/V: the g query heads of each KV head become g·Sq rows of one head.
        out, lse = attention_with_lse(q.reshape(b, k.shape[1], groups * sq, d), k, v, False, scale)
        return out.reshape(b, hq, sq, -1), lse.reshape(b, hq, sq)
    if q.device.type == "cpu" and not causal and sq <= SMALL_QUERY:
        return _math(q, k, v, False, scale)  # decode: a GEMV; the flash kernel's tiling only costs here
    ke, ve = _expand_kv(q, k, v)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, ke, ve, 0.0, causal, scale=scale)
        return out, lse.float()
    return _math(q, k, v, causal, scale)



_FLASH_VARLEN_OK: dict[tuple, bool] = {}  # (device, dtype, head_dim) -> flash varlen with seqused_k is right here


def _decode_matmul(q, k, v, used: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain path: the g = Hq / Hkv query heads of a KV head are g rows of one matrix product, softmax in fp32."""
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    qg = q.reshape(b, hkv, hq // hkv, d).float()  # [B, Hkv, g, D]
    logits = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, Hkv, g, N]
    valid = torch.arange(n, device=q.device) < used
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, Hkv, g, 1]
    out = torch.matmul(torch.exp(logits - lse), v.float())  # [B, Hkv, g, D]
    return out.reshape(b, hq, 1, d).to(q.dtype), lse.reshape(b, hq, 1)


def _decode_flash_varlen(q, k, v, used: torch.Tensor, scale: float, cu_q: torch.Tensor,
                         cu_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention's varlen kernel reading only the first `used` keys (seqused_k, a device tensor): the
    cache stays [B, Hkv, N, D] and is viewed as [N, Hkv, D] rows, no copy."""
    b, hq, _, d = q.shape
    n = k.shape[2]
    out, lse = torch.ops.aten._flash_attention_forward(
        q.reshape(1, hq, d), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_q, cu_k, 1, n, 0.0, False, False,
        scale=scale, seqused_k=used,
    )[:2]
    return out.reshape(b, hq, 1, d), lse.float().reshape(b, hq, 1)


def flash_varlen_ok(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether flash's varlen kernel with seqused_k runs here and matches the fp32 plain path (checked once, on a
    small probe, outside any graph capture)."""
    key = (str(device), dtype, head_dim)
    if key not in _FLASH_VARLEN_OK:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(1, 8, 1, head_dim, device=device, dtype=dtype, generator=g)
            k = torch.randn(1, 2, 300, head_dim, device=device, dtype=dtype, generator=g)
            v = torch.randn(1, 2, 300, head_dim, device=device, dtype=dtype, generator=g)
            cu_q = torch.tensor([0, 1], dtype=torch.int32, device=device)
            cu_k = torch.tensor([0, 300], dtype=torch.int32, device=device)
            for filled in (1, 137, 300):
                used = torch.tensor([filled], dtype=torch.int32, device=device)
                out, lse = _decode_flash_varlen(q, k, v, used, head_dim**-0.5, cu_q, cu_k)
                ref, ref_lse = _decode_matmul(q, k, v, used, head_dim**-0.5)
                ok = _close(out, lse, ref, ref_lse)
                if not ok:
                    break
        except (RuntimeError, TypeError):
            ok = False
        _FLASH_VARLEN_OK[key] = ok
    return _FLASH_VARLEN_OK[key]


class DecodeAttention:
    """One query row per head over a preallocated cache of which the first `used` keys are filled: static shapes
    and no host sync, so a decode step can be captured in a CUDA graph.

    CUDA: flash attention's varlen kernel, told the filled length through a device tensor (seqused_k), splitting
    the keys over the multiprocessors itself; elsewhere (or where the probe fails) plain matrix products with the
    softmax in fp32. Built once per decoder (outside capture: it allocates the kernel's index tensors).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, head_dim: int, capacity: int) -> None:
        self.flash = device.type == "cuda" and flash_varlen_ok(device, dtype, head_dim)
        self.cu_q = torch.tensor([0, 1], dtype=torch.int32, device=device)
        self.cu_k = torch.tensor([0, capacity], dtype=torch.int32, device=device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, Hq, 1, D]; k, v [B, Hkv, N, D]; used [1] int32 -> out [B, Hq, 1, D], lse [B, Hq, 1] fp32."""
        if self.flash:
            return _decode_flash_varlen(q, k, v, used, scale, self.cu_q, self.cu_k)
        return _decode_matmul(q, k, v, used, scale)
