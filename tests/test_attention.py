"""The APB attention op equals the dense masked reference (fp32, max abs diff <= 1e-5)."""

import itertools

import pytest
import torch

from apb_core.algorithm.attention import apb_attention, apb_attention_reference, apb_mask, merge_partials
from kernels import attention_with_lse, reference_attention

CASES = list(itertools.product([0, 1, 7, 16], [0, 5, 33], [1, 9, 40]))  # anchor, passing, local


@pytest.mark.parametrize("anchor,passing,local", CASES)
def test_apb_attention_matches_dense_reference(anchor, passing, local):
    """The engine's APB-mask path (three calls + LSE merge) == the dense masked reference."""
    g = torch.Generator().manual_seed(anchor * 1000 + passing * 10 + local)
    hq, hkv, d = 6, 2, 16
    q = torch.randn(1, hq, anchor + local, d, generator=g)
    k = torch.randn(1, hkv, anchor + local, d, generator=g)
    v = torch.randn(1, hkv, anchor + local, d, generator=g)
    kp = torch.randn(1, hkv, passing, d, generator=g) if passing else None
    vp = torch.randn(1, hkv, passing, d, generator=g) if passing else None
    fast = apb_attention(q, k, v, anchor, kp, vp, scale=d**-0.5)
    ref = apb_attention_reference(q, k, v, anchor, kp, vp, scale=d**-0.5)
    assert fast.shape == ref.shape
    assert (fast - ref).abs().max().item() <= 1e-5


def test_mask_shape_and_rules():
    m = apb_mask(anchor_len=2, passing_len=3, local_len=2)
    # anchor rows: causal over anchor, no passing
    assert m[0].tolist() == [False, False, False, True, False, False, False]
    assert m[1].tolist() == [False, False, False, True, True, False, False]
    # local rows: all passing, all anchor, causal local
    assert m[2].tolist() == [True, True, True, True, True, True, False]
    assert m[3].tolist() == [True] * 7


def test_attention_with_lse_matches_reference_and_math_backend(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 13, 8, generator=g) for _ in range(3))
    for causal in (False, True):
        mask = torch.ones(13, 13, dtype=torch.bool).tril() if causal else None
        out, lse = attention_with_lse(q, k[:, :2], v[:, :2], causal=causal, scale=0.3)
        ref_out, ref_lse = reference_attention(q, k[:, :2], v[:, :2], mask, 0.3)
        assert (out - ref_out).abs().max() <= 1e-5
        assert (lse - ref_lse).abs().max() <= 1e-5


def test_merge_partials_is_exact_split_of_softmax():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 5, 8, generator=g)
    k = torch.randn(1, 2, 30, 8, generator=g)
    v = torch.randn(1, 2, 30, 8, generator=g)
    full, full_lse = reference_attention(q, k, v, None, 0.35)
    parts = [reference_attention(q, k[:, :, a:b], v[:, :, a:b], None, 0.35) for a, b in [(0, 7), (7, 8), (8, 30)]]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    assert (out - full).abs().max() <= 1e-6
    assert (lse - full_lse).abs().max() <= 1e-5


def test_merge_partials_ignores_empty_parts():
    out, lse = attention_with_lse(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 4),
                                  causal=False, scale=0.5)
    assert torch.isinf(lse).all() and (out == 0).all()
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    ref, ref_lse = attention_with_lse(q, k, v, causal=False, scale=0.5)
    merged, merged_lse = merge_partials([out, ref], [lse, ref_lse])
    assert (merged - ref).abs().max() <= 1e-6
