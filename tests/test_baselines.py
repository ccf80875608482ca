"""Exact baselines: ring (zigzag) and Ulysses over gloo workers equal full attention; the padded APB kernel
equals the dense reference. One start of the workers per host count runs every multi-process check."""


import pytest
import torch
from bench_workers import everything
from conftest import reference, run_hosts, tiny_model, tokens

from apb_core.algorithm.flops import apb_pairs
from apb_core.baselines.ring import ring_pairs, zigzag_plans
from apb_core.baselines.ulysses import block_plans, head_groups, ulysses_pairs
from kernels import reference_attention

CTX_LEN, QUERY_LEN, NEW_TOKENS = 61, 5, 16  # odd lengths: chunks and blocks of unequal size
# kind -> config overrides: the llama preset's 4 q / 2 kv heads, and mistral with 4 q / 1 kv head (Ulysses
# replicates the KV head)
KINDS = {"llama": {}, "mistral": {"num_key_value_heads": 1}}
OP_SHAPES = [(6, 2), (4, 4), (6, 3)]  # head splits that cut GQA groups across hosts


@pytest.fixture(scope="module", params=[2, 3])
def spawned(request):
    """Every multi-process result for one host count (one start of the workers: start-up dominates the time)."""
    hosts = request.param
    ctx, query = tokens(hosts, CTX_LEN), tokens(50 + hosts, QUERY_LEN)
    results = run_hosts(everything, hosts, ctx, query, KINDS, NEW_TOKENS, 7, 45, OP_SHAPES)
    return hosts, ctx, query, [r[0] for r in results], [r[1] for r in results]


@pytest.mark.parametrize("kind", KINDS)
def test_ring_and_ulysses_equal_full_attention(spawned, kind):
    hosts, ctx, query, results, _ = spawned
    ref_logits, ref_tokens = reference(tiny_model(kind, **KINDS[kind]), ctx, query, NEW_TOKENS)
    for method in ("ring", "ulysses"):
        held = 0
        for rank in range(hosts):
            logits, generated, block_len = results[rank][(kind, method)]
            assert (logits - ref_logits).abs().max().item() <= 1e-4, (method, rank)
            assert generated == ref_tokens, (method, rank)
            held += block_len
        assert held == CTX_LEN  # every context token cached exactly once


def test_prefill_ops_equal_causal_attention(spawned):
    hosts, _, _, _, results = spawned
    inputs = results[0]["inputs"]
    for (hq, hkv), (q, k, v) in inputs.items():
        n = q.shape[2]
        ref, _ = reference_attention(q, k, v, torch.ones(n, n, dtype=torch.bool).tril(), 16**-0.5)
        for name in ("ring", "ulysses"):
            rows = torch.zeros(n, dtype=torch.bool)
            for rank in range(hosts):
                out, pos = results[rank][(name, hq, hkv)]
                assert (out - ref[:, :, pos]).abs().max().item() <= 1e-5, (name, hq, hkv, rank)
                rows[pos] = True
            assert rows.all()


@pytest.mark.parametrize("n,hosts", [(61, 2), (61, 3), (128, 4), (7, 3)])
def test_zigzag_layout_covers_context_at_true_positions_and_balances_work(n, hosts):
    plans = zigzag_plans(n, hosts)
    positions = torch.cat([p.position_ids()[0] for p in plans])
    assert sorted(positions.tolist()) == list(range(n))
    ids = list(range(1000, 1000 + n))
    for plan in plans:
        assert plan.input_ids(ids)[0].tolist() == [ids[i] for i in plan.position_ids()[0].tolist()]
        assert plan.position_ids()[0].tolist() == sorted(plan.position_ids()[0].tolist())
    pairs = [ring_pairs(p) for p in plans]
    assert sum(pairs) == n * (n + 1) // 2  # exactly the causal pairs, each once
    if n % (2 * hosts) == 0:  # equal chunks: equal work on every host
        assert len(set(pairs)) == 1


@pytest.mark.parametrize("hq,hkv,hosts", [(32, 8, 2), (32, 8, 3), (4, 2, 3), (4, 1, 4), (6, 3, 4)])
def test_ulysses_head_groups_cover_heads_and_their_kv(hq, hkv, hosts):
    groups = head_groups(hq, hkv, hosts)
    assert [h for (a, b), _ in groups for h in range(a, b)] == list(range(hq))
    g = hq // hkv
    for (a, b), (ka, kb) in groups:
        assert {h // g for h in range(a, b)} == set(range(ka, kb))
    n = 97
    assert sum(ulysses_pairs(p, hq, hkv) for p in block_plans(n, hosts)) == pytest.approx(n * (n + 1) / 2)


def test_ulysses_needs_a_head_per_host():
    with pytest.raises(ValueError, match="query head per host"):
        head_groups(2, 1, 3)


def test_mask_pairs_count_the_dense_mask():
    from apb_core.algorithm.attention import apb_mask

    for a, p, n in [(2, 3, 2), (0, 0, 9), (5, 0, 7), (0, 11, 4), (8, 16, 64)]:
        assert apb_pairs(a, p, n) == int(apb_mask(a, p, n).sum())


def _cpu_kernel(q, k, v, causal, scale, head_map):
    """A stand-in for a GPU kernel on CPU: K/V heads picked per query head by `head_map`."""
    hq, hkv = q.shape[1], k.shape[1]
    index = torch.tensor([head_map(h, hq, hkv) for h in range(hq)])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.float(), k.float().index_select(1, index), v.float().index_select(1, index), 0.0, causal, scale=scale)
    return out.to(q.dtype), lse.float()


@pytest.mark.parametrize("head_map,expected", [
    (lambda h, hq, hkv: h // (hq // hkv), True),  # grouped heads read as GQA means
    (lambda h, hq, hkv: h % hkv, False),  # a kernel that interleaves groups must be caught
])
def test_gpu_path_probes_accept_right_kernels_and_catch_wrong_ones(monkeypatch, head_map, expected):
    """The once-per-device probes that decide whether cuDNN / flash may read grouped K/V heads directly."""
    from kernels import sdpa_lse

    fake = lambda q, k, v, causal, scale: _cpu_kernel(q, k, v, causal, scale, head_map)  # noqa: E731
    monkeypatch.setattr(sdpa_lse, "_flash", fake)
    monkeypatch.setattr(sdpa_lse, "_FLASH_OK", {})
    assert sdpa_lse.flash_few_rows_ok(torch.device("cpu"), torch.float32, 16) is expected
    expanded = lambda q, k, v, causal, scale: _cpu_kernel(q, k, v, causal, scale, lambda h, hq, hkv: h)  # noqa: E731
    monkeypatch.setattr(sdpa_lse, "_cudnn", lambda q, k, v, c, s: (fake if k.shape[1] != q.shape[1] else expanded)(
        q, k, v, c, s))
    monkeypatch.setattr(sdpa_lse, "_NATIVE_GQA", {})
    assert sdpa_lse.native_gqa_ok(torch.device("cpu"), torch.float32, 16) is expected
