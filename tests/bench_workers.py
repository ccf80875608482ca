"""Worker bodies for the baseline (ring, Ulysses) tests, importable by spawned processes."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from dist_utils import tiny_model

from apb_core.bench import decode, prefill, setup_method
from apb_core.engine import HostEngine
from apb_core.prompt import Prompt
from apb_core.ring import ring_prefill_op, zigzag_plans
from apb_core.ulysses import block_plans, ulysses_prefill_op


def baselines(rank: int, hosts: int, ctx: list[int], query: list[int], kinds: list[str], new_tokens: int) -> dict:
    """Ring and Ulysses end to end on each tiny model: {(kind, method): (logits after the query, tokens)}."""
    prompt = Prompt(list(ctx), list(query), [], [], 0)
    out = {}
    for kind in kinds:
        engine = HostEngine(tiny_model(kind), rank, hosts)
        for method in ("ring", "ulysses"):
            setup = setup_method(engine, method, prompt)
            prefill(engine, setup, prompt, reserve=len(query) + new_tokens + 1)
            logits, tokens, _, _ = decode(engine, prompt, new_tokens)
            out[(kind, method)] = (logits, tokens, setup.plan.block_len)
    return out


def everything(rank: int, hosts: int, ctx: list[int], query: list[int], kinds: list[str], new_tokens: int,
               seed: int, n: int, shapes: list[tuple[int, int]]) -> tuple[dict, dict]:
    """Both checks in one process start (importing transformers costs seconds per process)."""
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
        for name, plan, op in (("ring", zigzag_plans(n, hosts)[rank], ring_prefill_op),
                               ("ulysses", block_plans(n, hosts)[rank], ulysses_prefill_op)):
            pos = plan.position_ids()[0]
            engine = SimpleNamespace(plan=plan, group=None)
            result = op(engine, 0, q[:, :, pos], k[:, :, pos], v[:, :, pos], 16**-0.5)
            out[(name, hq, hkv)] = (result, pos)
    return out
