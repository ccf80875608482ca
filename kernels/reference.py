"""Dense, masked attention in fp32: the reference every fast path is tested against (CPU, small shapes)."""

from __future__ import annotations

import torch


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ·scale + mask) v with an explicit boolean mask (True = may attend).

    q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D] (GQA: Hq is a multiple of Hkv); mask: [Sq, Sk] bool or None.
    Returns out [B, Hq, Sq, D] in q's dtype and lse [B, Hq, Sq] fp32 (-inf for rows that see no key).
    """
    groups = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(groups, dim=1)
    vf = v.float().repeat_interleave(groups, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), kf) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("bhqk,bhkd->bhqd", probs, vf)
    return out.to(q.dtype), lse
