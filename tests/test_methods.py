"""Method resolution: the default layout table, balanced blocks, and apb's auto-exact choice by the FLOP model."""

from __future__ import annotations

import math

import pytest

from apb_core.algorithm.attention import apb_mask
from apb_core.algorithm.flops import (
    FLOPS_PER_BYTE,
    ModelDims,
    balanced_lengths,
    last_host_flops,
    layout_flops,
    passing_bytes,
)
from apb_core.algorithm.layout import default_lengths
from apb_core.algorithm.methods import EXACT_SLACK, resolve_method

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
    for layout in ("equal", "balanced"):
        for n in (1000, 4000, 16000, 64000):
            a, p = default_lengths(n, 2)
            exact_lens, apb_lens = _lens(layout, n, 2, 0, "all"), _lens(layout, n, 2, a, p)
            price = FLOPS_PER_BYTE["cpu"]  # resolve_method's default device
            exact = max(layout_flops(LLAMA_8B, exact_lens, 0, "all"))
            exact += price * passing_bytes(LLAMA_8B, exact_lens, "all")
            apb = max(layout_flops(LLAMA_8B, apb_lens, a, p)) + price * passing_bytes(LLAMA_8B, apb_lens, p)
            chosen = resolve_method("apb", n, 2, dims=LLAMA_8B, layout=layout)
            assert chosen.auto_exact == (exact / apb <= EXACT_SLACK) and chosen.layout == layout


def _lens(layout: str, n: int, hosts: int, anchor, passing) -> list[int]:
    if layout == "equal":
        return [n // hosts + (1 if h < n % hosts else 0) for h in range(hosts)]
    return balanced_lengths(LLAMA_8B, n, hosts, anchor, passing)


@pytest.mark.parametrize("dims", [SMOLLM2, LLAMA_8B], ids=["smollm2", "llama8b"])
@pytest.mark.parametrize("n,hosts", [(8192, 2), (32768, 4), (131072, 2), (131072, 8), (20000, 3)])
@pytest.mark.parametrize("method", ["apb", "star", "full"])
def test_balanced_blocks_give_every_host_the_same_work(dims, n, hosts, method):
    """The balanced layout's per-host FLOPs (model) are within 5 % of each other; the equal layout's are not."""
    config = resolve_method(method, n, hosts, dims=dims, auto_exact=False, layout="balanced")
    lens = list(config.block_lens)
    assert sum(lens) == n and min(lens) >= 1 and len(lens) == hosts
    anchor = config.anchor_len
    work = layout_flops(dims, lens, anchor, config.passing_len)
    assert max(work) <= 1.05 * min(work), (lens, work)
    equal = resolve_method(method, n, hosts, dims=dims, auto_exact=False, layout="equal")
    equal_work = layout_flops(dims, list(equal.block_lens), anchor, equal.passing_len)
    assert max(equal_work) > 1.05 * min(equal_work)  # what balancing fixes
    assert max(work) < max(equal_work)  # and the busiest host gets less to do


def test_balanced_at_128k_over_2_hosts_matches_the_issue_numbers():
    """Llama-3.1-8B, 128K over 2 hosts, APB's defaults (anchor 8K, passing 8K): about 72K / 59K tokens."""
    config = resolve_method("apb", 131072, 2, dims=LLAMA_8B, auto_exact=False)
    first, second = config.block_lens
    assert 70_000 <= first <= 74_000 and first + second == 131072


def test_explicit_lengths_or_opt_out_force_the_approximation():
    assert not resolve_method("apb", 4000, 2, anchor_len=100, dims=SMOLLM2).auto_exact
    assert not resolve_method("apb", 4000, 2, passing_len=64, dims=SMOLLM2).auto_exact
    forced = resolve_method("apb", 4000, 2, dims=SMOLLM2, auto_exact=False)
    assert not forced.auto_exact and (forced.anchor_len, forced.passing_len) == default_lengths(4000, 2)
    assert not resolve_method("apb", 4000, 2).auto_exact  # no model shape: the table


def test_passing_bytes_count_every_slot_of_every_layer():
    # 3 hosts, blocks 10/7/5, l_p 6 -> slots of 6 tokens; K and V of 3 KV heads x 64 dims in bf16, 30 layers
    assert passing_bytes(SMOLLM2, [10, 7, 5], 6) == 3 * 6 * (2 * 3 * 64 * 2 * 30)
    assert passing_bytes(SMOLLM2, [10, 7, 5], "all") == 3 * 10 * (2 * 3 * 64 * 2 * 30)
    assert passing_bytes(SMOLLM2, [10, 7, 5], 0) == 0


def test_auto_exact_prices_the_all_gathers_on_the_device():
    """A small model at 4K: its prefill is so cheap that, on a GPU, gathering every earlier block's K/V costs
    more than APB's anchor; on the CPU machine's gloo the FLOPs decide (the prices are FLOPS_PER_BYTE)."""
    assert FLOPS_PER_BYTE["cuda"] > FLOPS_PER_BYTE["cpu"]
    assert resolve_method("apb", 4000, 2, dims=SMOLLM2, device="cpu").auto_exact
    assert not resolve_method("apb", 4000, 2, dims=SMOLLM2, device="cuda").auto_exact
    assert resolve_method("apb", 32 * 1024, 2, dims=LLAMA_8B, device="cuda").auto_exact  # 8B: exact up to ~32K
    assert not resolve_method("apb", 128 * 1024, 2, dims=LLAMA_8B, device="cuda").auto_exact


@pytest.mark.parametrize("ablation", [{"scorer": "random"}, {"scorer": "retaining_heads"},
                                      {"question_in_anchor": False}])
def test_auto_exact_never_replaces_an_explicit_ablation(ablation):
    """Where the default apb runs the exact layout, an explicit compressor or the question left out of the anchor
    still runs compressed, and the config says what ran."""
    from apb_core.algorithm.flops import ModelDims
    from apb_core.models import build_config

    dims = ModelDims.from_config(build_config("smollm2-135m"))
    default = resolve_method("apb", 3000, 2, dims=dims)
    assert default.auto_exact and default.compressor == "none" and default.passing_len == "all"
    method = resolve_method("apb", 3000, 2, dims=dims, **ablation)
    assert not method.auto_exact and method.anchor_len > 0 and method.passing_len != "all"
    assert method.compressor == ablation.get("scorer", "query_aware")
    assert method.question_in_anchor == ablation.get("question_in_anchor", True)
