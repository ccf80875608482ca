"""Compressor: planted high-scoring tokens are kept; per-head selections follow per-head scores."""

import torch

from apb_core.algorithm.compressor import query_aware_scores, random_scores, select_top


def test_query_aware_keeps_planted_tokens():
    g = torch.Generator().manual_seed(0)
    hkv, group, d, n = 2, 3, 32, 200
    q = torch.randn(1, hkv * group, 4, d, generator=g) * 0.1
    k = torch.randn(1, hkv, n, d, generator=g) * 0.1
    planted = {0: [17, 120, 121, 180], 1: [3, 60, 199]}
    direction = [q[0, h * group : (h + 1) * group].mean(dim=(0, 1)) for h in range(hkv)]
    for h, positions in planted.items():
        for p in positions:
            k[0, h, p] = direction[h] / direction[h].norm() * 8.0  # keys the question attends to
    scores = query_aware_scores(q, k, scale=d**-0.5)
    assert scores.shape == (hkv, n)
    idx = select_top(scores, keep=20)
    for h, positions in planted.items():
        assert set(positions) <= set(idx[h].tolist()), h
    assert (idx.diff(dim=-1) > 0).all()  # position order, no duplicates


def test_per_head_selections_differ_when_scores_differ():
    scores = torch.zeros(2, 50)
    scores[0, 5] = 10.0
    scores[1, 40] = 10.0
    idx = select_top(scores, keep=5)
    assert 5 in idx[0].tolist() and 40 not in idx[0].tolist()
    assert 40 in idx[1].tolist() and 5 not in idx[1].tolist()
    # the width-5 max-pool keeps the planted token's neighbours too
    assert set(idx[0].tolist()) == {3, 4, 5, 6, 7}


def test_keep_is_capped_by_block_and_random_is_seeded():
    assert select_top(torch.randn(3, 4), keep=10).shape == (3, 4)
    a, b = random_scores(30, 2, 7, "cpu"), random_scores(30, 2, 7, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, random_scores(30, 2, 8, "cpu"))


def test_several_questions_score_each_then_keep_the_max():
    """Two questions over one prefill: each scores the block alone (mean over its tokens), a token keeps the
    max; a token only the short question attends to is kept although the long one outweighs it in a sum."""
    g = torch.Generator().manual_seed(3)
    hkv, group, d, n = 2, 2, 8, 12
    k = torch.randn(1, hkv, n, d, generator=g)
    q1 = torch.randn(1, hkv * group, 6, d, generator=g)
    q2 = torch.randn(1, hkv * group, 2, d, generator=g)
    q = torch.cat([q1, q2], dim=2)
    one, two = query_aware_scores(q1, k, 0.5), query_aware_scores(q2, k, 0.5)
    both = query_aware_scores(q, k, 0.5, (6, 2))
    assert torch.allclose(both, torch.maximum(one / 6, two / 2))
    assert torch.allclose(query_aware_scores(q1, k, 0.5, (6,)), one)  # one question: the plain sum
