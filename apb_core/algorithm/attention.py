"""APB attention: the mask of the paper built from dense and square-causal pieces merged by log-sum-exp.

Host h's prefill sequence is [anchor (l_a) | local (n)], keys are [passing (P) | anchor | local]:
- anchor rows see the anchor causally (and no passing),
- local rows see all passing, all anchor and the local block causally.
SDPA's `is_causal` aligns top-left, so instead of one call with a lower-right mask we make three calls with
no mask or a square causal one, and merge the two partials of the local rows by LSE. `merge_partials` is the
one log-sum-exp merge of the project: decode, ring attention and this split all use it.
"""

from __future__ import annotations

import torch

from kernels import attention_with_lse, reference_attention


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of disjoint key sets, from each set's partial output and LSE.

    outs[i]: [..., S, D]; lses[i]: [..., S] fp32 (-inf where a part saw no key). Merged in fp32; returns
    (out in outs[0].dtype, lse fp32). A row that no part saw gets out = 0 and lse = -inf.
    """
    lse_stack = torch.stack(lses)  # [P, ..., S]
    lse = torch.logsumexp(lse_stack, dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(lse_stack - safe.unsqueeze(0)).nan_to_num(0.0)  # [P, ..., S]
    out = sum(w.unsqueeze(-1) * o.float() for w, o in zip(weights, outs, strict=True))
    return out.to(outs[0].dtype), lse


def attend_after_prefix(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of q (aligned with k_new) see every prefix key and the new keys causally (bottom-right causal).

    q: [B, Hq, S, D]; k_new/v_new: [B, Hkv, S, D]; k_prefix/v_prefix: [B, Hkv, P, D] (P may be 0).
    Returns (out [B, Hq, S, D], lse [B, Hq, S] fp32).
    """
    out_new, lse_new = attention_with_lse(q, k_new, v_new, causal=True, scale=scale)
    if k_prefix.shape[2] == 0:
        return out_new, lse_new
    out_pre, lse_pre = attention_with_lse(q, k_prefix, v_prefix, causal=False, scale=scale)
    return merge_partials([out_pre, out_new], [lse_pre, lse_new])


def apb_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    anchor_len: int,
    k_pass: torch.Tensor | None,
    v_pass: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of one host's prefill under the APB mask.

    q: [B, Hq, S, D], k, v: [B, Hkv, S, D] with S = anchor_len + local rows; k_pass, v_pass: [B, Hkv, P, D]
    or None. Returns out [B, Hq, S, D]. With anchor_len = 0 and no passing this is plain causal attention.
    """
    a = anchor_len
    if k_pass is None:
        k_pass = k[:, :, :0]
        v_pass = v[:, :, :0]
    k_prefix = torch.cat([k_pass, k[:, :, :a]], dim=2) if a else k_pass
    v_prefix = torch.cat([v_pass, v[:, :, :a]], dim=2) if a else v_pass
    out_local, _ = attend_after_prefix(q[:, :, a:], k_prefix, v_prefix, k[:, :, a:], v[:, :, a:], scale)
    if a == 0:
        return out_local
    out_anchor, _ = attention_with_lse(q[:, :, :a], k[:, :, :a], v[:, :, :a], causal=True, scale=scale)
    return torch.cat([out_anchor, out_local], dim=2)


def apb_mask(anchor_len: int, passing_len: int, local_len: int, device=None) -> torch.Tensor:
    """The APB mask as a dense bool matrix [anchor+local, passing+anchor+local] (tests only: it is N×N)."""
    a, p, n = anchor_len, passing_len, local_len
    mask = torch.zeros(a + n, p + a + n, dtype=torch.bool, device=device)
    mask[:a, p : p + a] = torch.ones(a, a, dtype=torch.bool, device=device).tril()
    mask[a:, : p + a] = True
    mask[a:, p + a :] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask


def apb_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    anchor_len: int,
    k_pass: torch.Tensor | None,
    v_pass: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """apb_attention computed densely from `apb_mask` in fp32: the reference the fast path must equal."""
    p = 0 if k_pass is None else k_pass.shape[2]
    keys = k if k_pass is None else torch.cat([k_pass, k], dim=2)
    values = v if v_pass is None else torch.cat([v_pass, v], dim=2)
    mask = apb_mask(anchor_len, p, q.shape[2] - anchor_len, device=q.device)
    out, _ = reference_attention(q, keys, values, mask, scale)
    return out
