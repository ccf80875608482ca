"""The engine over H gloo workers: exact mode == one-process full attention; decode merge; Star reference."""

import pytest
import torch
from conftest import reference, run_hosts, tiny_model, tokens
from engine_workers import answer, decode_merge, shared_answers

from apb_core.algorithm.flops import ModelDims
from apb_core.algorithm.methods import resolve_method
from kernels import reference_attention

CTX_LEN, QUERY_LEN = 61, 5  # odd lengths: blocks of unequal size


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_exact_mode_equals_full_attention(kind, hosts):
    ctx, query = tokens(hosts, CTX_LEN), tokens(100 + hosts, QUERY_LEN)
    ref_logits, ref_tokens = reference(tiny_model(kind), ctx, query)
    methods = [("full", None, None), ("apb", 0, "all"), ("full", None, None, "balanced"), ("apb", 0, "all", "balanced")]
    dims = ModelDims.from_config(tiny_model(kind).config)
    balanced = resolve_method("full", CTX_LEN, hosts, dims=dims, layout="balanced").block_lens
    assert len(set(balanced)) > 1 and sum(balanced) == CTX_LEN  # the balanced run really cuts unequal blocks
    results = run_hosts(answer, hosts, kind, ctx, query, methods)
    for m in range(len(methods)):
        for rank in range(hosts):
            logits, generated, _ = results[rank][m]
            assert (logits - ref_logits).abs().max().item() <= 1e-4, (methods[m], rank)
            assert generated == ref_tokens, (methods[m], rank)


@pytest.mark.parametrize("kind", ["qwen3", "mistral"])
def test_one_host_is_plain_full_attention(kind):
    ctx, query = tokens(7, 40), tokens(8, 4)
    ref_logits, ref_tokens = reference(tiny_model(kind), ctx, query)
    [[(logits, generated, _)]] = run_hosts(answer, 1, kind, ctx, query, [("full", None, None)])
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert generated == ref_tokens


@pytest.mark.parametrize("hosts", [2, 3])
def test_distributed_decode_merge_equals_attention_over_concatenated_cache(hosts):
    results = run_hosts(decode_merge, hosts, 11)
    q, k_all, v_all, k_new, v_new = results[0][1]
    keys, values = torch.cat([k_all, k_new], 2), torch.cat([v_all, v_new], 2)
    n, s = k_all.shape[2], q.shape[2]
    mask = torch.ones(s, n + s, dtype=torch.bool)
    mask[:, n:] = torch.ones(s, s, dtype=torch.bool).tril()
    ref, _ = reference_attention(q, keys, values, mask, q.shape[-1] ** -0.5)
    for out, _ in results:
        assert (out - ref).abs().max().item() <= 1e-5


def _star_reference(kind, ctx, query, hosts):
    """Star Attention written independently with transformers' own cache: host h encodes [block0; block_h]
    (anchor at positions 0.., block at its global positions), keeps its block's KV; the query then attends
    to the concatenated caches exactly."""
    from transformers import DynamicCache

    model = tiny_model(kind)
    base, extra = divmod(len(ctx), hosts)
    sizes = [base + (1 if h < extra else 0) for h in range(hosts)]
    starts = [sum(sizes[:h]) for h in range(hosts)]
    per_layer_k = [[] for _ in range(model.config.num_hidden_layers)]
    per_layer_v = [[] for _ in range(model.config.num_hidden_layers)]
    with torch.no_grad():
        for h in range(hosts):
            block = ctx[starts[h] : starts[h] + sizes[h]]
            anchor = ctx[: sizes[0]] if h > 0 else []
            ids = torch.tensor([anchor + block])
            pos = torch.cat([torch.arange(len(anchor)), torch.arange(starts[h], starts[h] + sizes[h])])[None]
            cache = DynamicCache()
            model(ids, position_ids=pos, past_key_values=cache, use_cache=True)
            for layer in range(model.config.num_hidden_layers):
                per_layer_k[layer].append(cache.layers[layer].keys[:, :, len(anchor) :])
                per_layer_v[layer].append(cache.layers[layer].values[:, :, len(anchor) :])
        cache = DynamicCache()
        for layer in range(model.config.num_hidden_layers):
            cache.update(torch.cat(per_layer_k[layer], 2), torch.cat(per_layer_v[layer], 2), layer)
        n = len(ctx)
        out = model(torch.tensor([query]), position_ids=torch.arange(n, n + len(query))[None],
                    past_key_values=cache, cache_position=torch.arange(n, n + len(query)), use_cache=True)
    return out.logits[0, -1]


@pytest.mark.parametrize("hosts", [2, 3])
def test_star_equals_independent_reference(hosts):
    ctx, query = tokens(20 + hosts, CTX_LEN), tokens(30 + hosts, QUERY_LEN)
    ref = _star_reference("llama", ctx, query, hosts)
    results = run_hosts(answer, hosts, "llama", ctx, query, [("star", None, None)])
    for rank in range(hosts):
        logits, _, passing = results[rank][0]
        assert passing == 0
        assert (logits - ref).abs().max().item() <= 1e-4


def test_apb_compressed_runs_and_differs_from_exact():
    ctx, query = tokens(5, 80), tokens(6, 6)
    methods = [("apb", 8, 4), ("apb", 0, "all")]
    results = run_hosts(answer, 2, "llama", ctx, query, methods, tokens(9, 3), 2, query[:3])
    (apb_logits, _, apb_passing), (exact_logits, _, exact_passing) = results[1]
    assert apb_passing == 4 and exact_passing == 40
    assert torch.isfinite(apb_logits).all()
    assert (apb_logits - exact_logits).abs().max() > 1e-4  # the approximation is real
    # every host agrees on the merged logits
    assert (results[0][0][0] - apb_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("hosts", [2, 3])
@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("spec", [("full", None, None), ("apb", 0, "all"), ("star", None, None)])
def test_questions_over_one_prefill_equal_separate_runs(hosts, decode, spec):
    """Exact layouts (and star: its prefill reads no question): three questions over one prefill give the
    tokens and logits of three separate runs, and each query phase starts from the document-only cache."""
    ctx = tokens(20 + hosts, CTX_LEN)
    queries = [tokens(30, QUERY_LEN), tokens(31, QUERY_LEN + 3), tokens(32, 2)]
    results = run_hosts(shared_answers, hosts, spec, ctx, queries, decode)
    for rank, (separate, shared, lengths, block_len) in enumerate(results):
        assert lengths == [block_len] * len(queries), rank
        for q, ((ref_logits, ref_tokens), (logits, generated)) in enumerate(zip(separate, shared, strict=True)):
            assert (logits - ref_logits).abs().max().item() <= 1e-5, (rank, q)
            assert generated == ref_tokens and len(generated) == 12, (rank, q)


def test_apb_shared_prefill_puts_every_question_in_anchor_and_probe():
    """APB over one prefill: the prefill reads both questions, so answers may differ from separate runs, but
    every host agrees and the cache is document-only at each query phase; one question is the plain run."""
    ctx = tokens(5, 80)
    queries = [tokens(6, 6), tokens(7, 5)]
    questions, probes = [tokens(9, 3), tokens(10, 4)], [queries[0][:3], queries[1][:4]]
    results = run_hosts(shared_answers, 2, ("apb", 12, 6), ctx, queries, "eager", questions, probes, 2)
    for _separate, shared, lengths, block_len in results:
        assert lengths == [block_len, block_len]
        assert all(torch.isfinite(logits).all() for logits, _ in shared)
    assert (results[0][1][1][0] - results[1][1][1][0]).abs().max() <= 1e-5  # the hosts agree on the merge
    [(separate, shared, _, _)] = run_hosts(shared_answers, 1, ("apb", None, None), ctx, queries[:1])
    assert shared[0][1] == separate[0][1]
