"""The static decode step (the one CUDA graphs capture) equals the eager one: same logits at every token, fp32 on
CPU, max abs diff <= 1e-4, for one host and for the distributed decode over gloo workers."""

from __future__ import annotations

import torch

from apb_core.algorithm.layout import split_blocks
from apb_core.algorithm.methods import resolve_method
from apb_core.runtime.engine import HostEngine
from apb_core.runtime.generate import decode, host_plan
from apb_core.runtime.prompt import Prompt
from kernels import DecodeAttention, reference_attention

TOL = 1e-4


def _decode_logits(engine: HostEngine, prompt: Prompt, new_tokens: int) -> list[torch.Tensor]:
    """Prefill exactly, then decode greedily; the logits the last host saw before each token."""
    method = resolve_method("full", prompt.context_len, engine.hosts)
    block_lens = [e - s for s, e in split_blocks(prompt.context_len, engine.hosts)]
    engine.prefill(host_plan(engine, method, prompt), prompt.context_ids, passing=method.passing,
                   block_lens=block_lens, reserve=len(prompt.query_ids) + new_tokens + 1)
    seen: list[torch.Tensor] = []

    def choose(logits: torch.Tensor) -> int:
        seen.append(logits.detach().clone())
        return int(logits.argmax())

    decode(engine, prompt.query_ids, prompt.context_len, new_tokens, choose)
    return seen


def static_vs_eager(rank: int, hosts: int, kind: str, ctx: list[int], query: list[int], new_tokens: int):
    """Both decode modes on this host with the same weights; returns (eager logits, static logits) per token."""
    from conftest import tiny_model

    prompt = Prompt(list(ctx), list(query), [], [], 0)
    model = tiny_model(kind)
    eager = _decode_logits(HostEngine(model, rank, hosts, decode="eager"), prompt, new_tokens)
    static = _decode_logits(HostEngine(model, rank, hosts, decode="static"), prompt, new_tokens)
    return eager, static


def _ids(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n,), generator=g).tolist()


def test_decode_attention_matches_the_masked_reference():
    g = torch.Generator().manual_seed(0)
    hq, hkv, n, d = 8, 2, 37, 16
    q = torch.randn(1, hq, 1, d, generator=g)
    k = torch.randn(1, hkv, n, d, generator=g)
    v = torch.randn(1, hkv, n, d, generator=g)
    attention = DecodeAttention(torch.device("cpu"), torch.float32, d, n)
    for filled in (1, 20, 37):
        valid = torch.arange(n) < filled
        out, lse = attention(q, k, v, torch.tensor([filled], dtype=torch.int32), d**-0.5)
        ref, ref_lse = reference_attention(q, k, v, valid.view(1, n), d**-0.5)
        assert (out - ref).abs().max().item() <= 1e-5
        assert (lse - ref_lse).abs().max().item() <= 1e-5


def test_static_decode_equals_eager_on_one_host():
    eager, static = static_vs_eager(0, 1, "llama", _ids(1, 150), _ids(2, 9), 12)
    assert len(eager) == len(static) == 12
    for a, b in zip(eager, static, strict=True):
        assert (a - b).abs().max().item() <= TOL


def test_static_decode_equals_eager_over_three_hosts():
    from conftest import run_hosts

    results = run_hosts(static_vs_eager, 3, "qwen2", _ids(3, 200), _ids(4, 7), 10)
    eager, static = results[-1]  # the last host samples: its logits are the merged ones
    assert len(eager) == len(static) == 10
    for a, b in zip(eager, static, strict=True):
        assert (a - b).abs().max().item() <= TOL
