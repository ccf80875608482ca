"""Worker bodies for the baseline (ring, Ulysses) tests, importable by the worker processes."""

from __future__ import annotations

import torch
from conftest import tiny_model

from apb_core.baselines.ring import ring_prefill, zigzag_plans
from apb_core.baselines.ulysses import block_plans, ulysses_prefill
from apb_core.bench.host import setup_method
from apb_core.runtime.cache import HostCache
from apb_core.runtime.engine import HostEngine
from apb_core.runtime.generate import decode
from apb_core.runtime.prefill import PrefillCall
from apb_core.runtime.prompt import Prompt


def baselines(rank: int, hosts: int, ctx: list[int], query: list[int], kinds: dict[str, dict], new_tokens: int) -> dict:
    """Ring and Ulysses end to end on each tiny model (kind -> its config overrides):
    {(kind, method): (logits after the query, tokens, block_len)}."""
    prompt = Prompt(list(ctx), list(query), [], [], 0)
    out = {}
    for kind, overrides in kinds.items():
        engine = HostEngine(tiny_model(kind, **overrides), rank, hosts)
        for method in ("ring", "ulysses"):
            setup = setup_method(engine, method, prompt)
            engine.prefill(setup.plan, prompt.context_ids, setup.strategy, reserve=len(query) + new_tokens + 1)
            decoded = decode(engine, prompt.query_ids, len(ctx), new_tokens, lambda logits: int(logits.argmax()))
            out[(kind, method)] = (decoded.first_logits, decoded.tokens, setup.plan.block_len)
    return out


def everything(rank: int, hosts: int, ctx: list[int], query: list[int], kinds: dict[str, dict], new_tokens: int,
               seed: int, n: int, shapes: list[tuple[int, int]]) -> tuple[dict, dict]:
    """Both checks in one start of the workers."""
    return baselines(rank, hosts, ctx, query, kinds, new_tokens), ops(rank, hosts, seed, n, shapes)


def ops(rank: int, hosts: int, seed: int, n: int, shapes: list[tuple[int, int]]) -> dict:
    """The two prefill ops alone on shared random q, k, v of n tokens, for each (q heads, kv heads):
    {(op, hq, hkv): (this host's output, its global positions)} plus the global tensors under "inputs"."""
    out: dict = {"inputs": {}}
    for hq, hkv in shapes:
        g = torch.Generator().manual_seed(seed + hq * 10 + hkv)
        q = torch.randn(1, hq, n, 16, generator=g)
        k = torch.randn(1, hkv, n, 16, generator=g)
        v = torch.randn(1, hkv, n, 16, generator=g)
        out["inputs"][(hq, hkv)] = (q, k, v)
        for name, plan, op in (("ring", zigzag_plans(n, hosts)[rank], ring_prefill),
                               ("ulysses", block_plans(n, hosts)[rank], ulysses_prefill)):
            pos = plan.position_ids()[0]
            cache = HostCache(1, hkv, 16, plan.block_len, torch.float32, "cpu")
            call = PrefillCall(plan, op, cache, rank, hosts)
            result = call.attend(0, q[:, :, pos], k[:, :, pos], v[:, :, pos], 16**-0.5)
            out[(name, hq, hkv)] = (result, pos)
    return out
