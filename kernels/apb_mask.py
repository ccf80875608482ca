"""The whole APB mask as ONE square causal attention call, by padding the query with dummy rows.

APB's mask on host h (apb_core.attention): anchor rows see the anchor causally; local rows see every passing
key, every anchor key and the local keys causally. Split into pieces that SDPA can express (top-left causal
only), that is three kernel calls plus a log-sum-exp merge of the local rows' two partials. On a GPU the
merge and the extra launches cost time (several fp32 passes over a [Hq, n, D] tensor per layer).

Reorder the keys as [anchor | passing | local] and give the query one dummy row per passing key:

    q' = [q_anchor | 0 (P rows) | q_local]      k' = [k_anchor | k_pass | k_local]

Square top-left causal attention over q', k' then gives anchor row i the anchor keys 0..i (the passing
keys come later), and local row j every anchor key, every passing key and local keys 0..j: the APB mask.
The dummy rows are thrown away. They cost P * (a + (P+1)/2) query-key pairs that nobody uses: 3 % at
2 hosts and 128K (anchor 8K, passing 8K, block 64K), about 37 % at 8 hosts (passing 7 x 2K).
Zero dummy rows give a uniform softmax (finite): nothing undefined is computed.

Measured on an H100 (2026-11-22, scripts/gpu_kernels.py, bf16, 32 q / 8 kv heads, d = 128) at the 2-host
128K shape: 91.7 ms for this call against 89.6 ms for the three-call split (581.7 against 595.6 useful
TFLOP/s). cuDNN's causal kernel runs slower at 80K rows than at 64K, and the 3 % extra pairs cost more than
the merge saves, so the engine keeps the split (apb_core.attention.apb_attention). This module stays as the
measured alternative that the kernel benchmark times, and for `apb_pairs`, the useful work of the mask.
"""

from __future__ import annotations

import torch

from kernels.sdpa_lse import attention_with_lse


def apb_pairs(anchor_len: int, passing_len: int, local_len: int) -> int:
    """Query-key pairs the APB mask allows (the useful work of one host's attention, per head)."""
    a, p, n = anchor_len, passing_len, local_len
    return a * (a + 1) // 2 + n * (p + a) + n * (n + 1) // 2


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
