"""Method resolution: the default layout table, and apb's auto-exact choice by the FLOP model."""

from __future__ import annotations

import math

import pytest

from apb_core.attention import apb_mask
from apb_core.flops import ModelDims, last_host_flops
from apb_core.layout import default_lengths
from apb_core.methods import EXACT_SLACK, resolve_method

SMOLLM2 = ModelDims(hidden=576, intermediate=1536, layers=30, q_heads=9, kv_heads=3, head_dim=64, vocab=49152)
LLAMA_8B = ModelDims(hidden=4096, intermediate=14336, layers=32, q_heads=32, kv_heads=8, head_dim=128, vocab=128256)


@pytest.mark.parametrize(("n", "hosts", "anchor", "passing"), [(37, 2, 5, 3), (100, 4, 0, "all"), (64, 3, 9, 40)])
def test_last_host_flops_counts_the_mask(n, hosts, anchor, passing):
    block = math.ceil(n / hosts)
    received = (hosts - 1) * (block if passing == "all" else min(passing, block))
    pairs = int(apb_mask(anchor, received, block).sum())
    dims = SMOLLM2
    expected = dims.linear_flops_per_token * (anchor + block) + dims.attention_flops_per_pair * pairs
    assert last_host_flops(dims, n, hosts, anchor, passing) == pytest.approx(expected, rel=1e-12)


def test_short_contexts_run_exact_long_ones_compress():
    short = resolve_method("apb", 4000, 2, dims=SMOLLM2)
    assert short.auto_exact and short.anchor_len == 0 and short.passing_len == "all" and not short.probe
    long = resolve_method("apb", 8000, 2, dims=SMOLLM2)
    assert not long.auto_exact and (long.anchor_len, long.passing_len) == default_lengths(8000, 2)
    assert not resolve_method("apb", 128 * 1024, 2, dims=LLAMA_8B).auto_exact


def test_auto_exact_follows_the_cost_ratio():
    for n in (1000, 4000, 16000, 64000):
        a, p = default_lengths(n, 2)
        ratio = last_host_flops(LLAMA_8B, n, 2, 0, "all") / last_host_flops(LLAMA_8B, n, 2, a, p)
        assert resolve_method("apb", n, 2, dims=LLAMA_8B).auto_exact == (ratio <= EXACT_SLACK)


def test_explicit_lengths_or_opt_out_force_the_approximation():
    assert not resolve_method("apb", 4000, 2, anchor_len=100, dims=SMOLLM2).auto_exact
    assert not resolve_method("apb", 4000, 2, passing_len=64, dims=SMOLLM2).auto_exact
    forced = resolve_method("apb", 4000, 2, dims=SMOLLM2, auto_exact=False)
    assert not forced.auto_exact and (forced.anchor_len, forced.passing_len) == default_lengths(4000, 2)
    assert not resolve_method("apb", 4000, 2).auto_exact  # no model shape: the table
