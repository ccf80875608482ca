"""The attention mass that `--cite` collects during decode (apb_core.runtime.attention_mass) equals the dense
reference's attention probabilities: transformers' eager attention over the whole sequence, the rows that
predicted each answer token, summed over heads and the chosen layers, restricted to the context keys. fp32 on
CPU, 1e-5, on one host and over 2 and 3 gloo hosts (exact layout), eager and static decode."""

from __future__ import annotations

import pytest
import torch

from apb_core.algorithm.layout import split_blocks
from apb_core.algorithm.methods import resolve_method
from apb_core.runtime.attention_mass import cite_layers
from apb_core.runtime.engine import HostEngine
from apb_core.runtime.generate import decode, host_plan
from apb_core.runtime.prompt import Prompt

TOL = 1e-5


def collected_mass(rank: int, hosts: int, kind: str, ctx: list[int], query: list[int], new_tokens: int,
                   mode: str, fraction: float, rows: int | None = None):
    """Prefill `ctx` exactly on this host, collect the mass while decoding greedily (room for `rows` query rows,
    default new_tokens); (mass, tokens)."""
    from conftest import tiny_model

    engine = HostEngine(tiny_model(kind), rank, hosts, decode=mode)
    prompt = Prompt(list(ctx), list(query), [], [], 0)
    method = resolve_method("full", prompt.context_len, hosts)
    block_lens = [e - s for s, e in split_blocks(prompt.context_len, hosts)]
    engine.prefill(host_plan(engine, method, prompt), prompt.context_ids, passing=method.passing,
                   block_lens=block_lens, reserve=len(query) + new_tokens + 1)
    engine.collect_mass(cite_layers(engine.layers, fraction), new_tokens if rows is None else rows)
    engine.mass.reset()
    decoded = decode(engine, list(query), len(ctx), new_tokens, lambda logits: int(logits.argmax()))
    return engine.gather_mass(), decoded.tokens


def reference_mass(kind: str, ctx: list[int], query: list[int], tokens: list[int], fraction: float) -> torch.Tensor:
    """Dense attention probabilities of the rows that predicted `tokens`, summed over heads, rows and layers."""
    from conftest import tiny_model

    model = tiny_model(kind, attn="eager")
    ids = ctx + query + tokens[:-1]  # the last token is never fed back
    with torch.no_grad():
        attentions = model(torch.tensor([ids]), output_attentions=True).attentions  # L x [1, Hq, S, S]
    first = len(ctx) + len(query) - 1
    rows = slice(first, first + len(tokens))
    layers = cite_layers(len(attentions), fraction)
    return sum(attentions[i][0, :, rows, : len(ctx)].float().sum(dim=(0, 1)) for i in layers)


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_one_host_mass_equals_dense_attention(mode, fraction):
    ctx, query = _ids(1, 120), _ids(2, 7)
    mass, tokens = collected_mass(0, 1, "llama", ctx, query, 6, mode, fraction)
    ref = reference_mass("llama", ctx, query, tokens, fraction)
    assert mass.shape == (len(ctx),) and len(tokens) == 6
    assert (mass - ref).abs().max().item() <= TOL
    assert mass.sum().item() > 0


@pytest.mark.parametrize("hosts,mode", [(2, "eager"), (3, "static")])
def test_distributed_mass_equals_dense_attention(hosts, mode):
    from conftest import run_hosts

    ctx, query = _ids(3, 150), _ids(4, 5)
    results = run_hosts(collected_mass, hosts, "qwen2", ctx, query, 5, mode, 1.0)
    mass, tokens = results[0]
    assert all(torch.equal(mass, m) for m, _ in results)  # every host gathers the same vector
    ref = reference_mass("qwen2", ctx, query, tokens, 1.0)
    assert (mass - ref).abs().max().item() <= TOL


def test_eager_and_static_decode_collect_the_same_mass():
    ctx, query = _ids(5, 90), _ids(6, 4)
    eager, tokens_e = collected_mass(0, 1, "qwen2", ctx, query, 5, "eager", 0.25)
    static, tokens_s = collected_mass(0, 1, "qwen2", ctx, query, 5, "static", 0.25)
    assert tokens_e == tokens_s
    assert (eager - static).abs().max().item() <= TOL


def test_cite_layers_are_the_upper_quarter():
    assert cite_layers(30) == tuple(range(22, 30))
    assert cite_layers(2) == (1,)
    assert cite_layers(4, 1.0) == (0, 1, 2, 3)


def test_mass_folded_one_row_at_a_time_equals_dense_attention(monkeypatch):
    """The rows recorded during decode are folded after the answer in chunks sized by FOLD_BYTES: with chunks of
    one row the mass is the same."""
    from apb_core.runtime.attention_mass import AttentionMass

    monkeypatch.setattr(AttentionMass, "FOLD_BYTES", 1)
    ctx, query = _ids(7, 100), _ids(8, 5)
    mass, tokens = collected_mass(0, 1, "qwen2", ctx, query, 6, "static", 0.25)
    ref = reference_mass("qwen2", ctx, query, tokens, 0.25)
    assert (mass - ref).abs().max().item() <= TOL


def test_more_rows_than_reserved_is_an_error_not_a_wrong_mass():
    ctx, query = _ids(9, 60), _ids(10, 3)
    with pytest.raises(RuntimeError, match="recorded 5 query rows but had room for 2"):
        collected_mass(0, 1, "llama", ctx, query, 5, "eager", 1.0, rows=2)
