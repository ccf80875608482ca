"""CPU micro-benchmark of `--cite`'s attention mass: what a decode step pays and what the answer pays after it.

Times AttentionMass over `--steps` rows of random q/K/lse (one thread): the per-step `add` (now a record of the
query row and lse) and the `fold` after the answer; with `--old FILE` (an earlier attention_mass.py, e.g.
`git show c5e18cf:apb_core/runtime/attention_mass.py > /tmp/old_mass.py`, whose `add` computed the probabilities
inside every step) the same rows through that one, and the largest relative difference of the two masses.

    python scripts/cite_mass_micro.py --old /tmp/old_mass.py

`--decode ROOT` instead times whole decode steps of a checkout at ROOT (e.g. `git worktree add /tmp/old c5e18cf`):
the tests' tiny Llama, 2 hosts taking turns in this process, compressed APB over 2,000 tokens, static decode,
48 tokens, four alternating pairs without and with `cite`: ms per token after the query phase (this checkout's
`decode_s` includes the fold).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apb_core.runtime.attention_mass import AttentionMass  # noqa: E402

SHAPES = [  # (name, query heads, KV heads, head dim, block keys, cited layers)
    ("SmolLM2-135M, 4K block", 9, 3, 64, 4096, 8),
    ("Qwen2.5-0.5B, 16K block", 14, 2, 64, 16384, 6),
    ("Llama-3.1-8B, 16K block", 32, 8, 128, 16384, 8),
]


def _load(path: str):
    spec = importlib.util.spec_from_file_location("old_attention_mass", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time(make, ks, qs, lse, steps: int, fold: bool) -> tuple[float, float, torch.Tensor]:
    """Best of three: (ms per step in add, ms of the fold, the mass). fold: the current AttentionMass (add
    records, fold computes); else the old one (add(layer, q, k_block, lse, scale) computes)."""
    best = None
    for _ in range(3):
        mass = make()
        t0 = time.perf_counter()
        for _ in range(steps):
            for layer, (k, q) in enumerate(zip(ks, qs, strict=True)):
                if fold:
                    mass.add(layer, q, lse, 0.125)
                else:
                    mass.add(layer, q, k, lse, 0.125)
        t1 = time.perf_counter()
        if fold:
            mass.fold(lambda layer: ks[layer])
        t2 = time.perf_counter()
        run = ((t1 - t0) / steps * 1e3, (t2 - t1) * 1e3, mass.mass.clone())
        best = run if best is None or sum(run[:2]) < sum(best[:2]) else best
    return best


def decode_steps(root: str) -> None:
    """Whole decode steps of the checkout at `root`, without and with citations (see the module docstring)."""
    sys.path[:0] = [str(Path(root) / "tests"), str(root)]
    for name in [m for m in sys.modules if m == "apb_core" or m.startswith("apb_core.")]:
        del sys.modules[name]
    torch.set_num_threads(2)
    from test_workers import in_process, tokens

    from apb_core.algorithm.methods import resolve_method
    from apb_core.runtime.generate import AskJob
    from apb_core.runtime.prompt import Prompt

    ctx, query = tokens(41, 2000), tokens(42, 8)
    method = resolve_method("apb", len(ctx), 2, 256, 128, auto_exact=False)
    per_token: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(4):
        for cite in (False, True):
            job = AskJob(Prompt(ctx, query, query[:4], query[:4], 0), method, max_new_tokens=48, cite=cite)
            result = in_process(2, job, decode="static")[-1][0]
            steps = max(1, len(result.token_ids) - 1)
            per_token[cite].append((result.decode_s - result.query_s) / steps * 1e3)
    for cite, values in per_token.items():
        print(f"{root}: {'cite ' if cite else 'plain'} " + " ".join(f"{v:.2f}" for v in values) + " ms/token")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--old", default=None, help="an earlier attention_mass.py to compare with")
    p.add_argument("--decode", default=None, metavar="ROOT", help="time whole decode steps of the checkout at ROOT")
    args = p.parse_args()
    if args.decode:
        decode_steps(args.decode)
        return
    torch.set_num_threads(1)
    old = _load(args.old) if args.old else None
    for name, hq, hkv, d, block, layers in SHAPES:
        g = torch.Generator().manual_seed(0)
        ks = [torch.randn(1, hkv, block, d, generator=g) for _ in range(layers)]
        qs = [torch.randn(1, hq, 1, d, generator=g) for _ in range(layers)]
        lse = torch.full((1, hq, 1), 5.0)
        def make_new(block=block, layers=layers):
            return AttentionMass(block, tuple(range(layers)), "cpu", args.steps)

        def make_old(block=block, layers=layers):
            return old.AttentionMass(block, tuple(range(layers)), "cpu")

        new = _time(make_new, ks, qs, lse, args.steps, True)
        line = (f"{name}, {layers} layers, {args.steps} steps: record {new[0]:.3f} ms/step, fold {new[1]:.1f} ms "
                f"once ({new[1] / args.steps:.2f} ms/step)")
        if old is not None:
            before = _time(make_old, ks, qs, lse, args.steps, False)
            diff = (before[2] - new[2]).abs().max().item() / before[2].abs().max().item()
            line += f"; per-step add (--old) {before[0]:.2f} ms/step; masses differ by {diff:.1e} (relative)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
