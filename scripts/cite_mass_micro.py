"""CPU micro-benchmark of `--cite`'s attention mass: what a decode step pays and what the answer pays after it.

Times AttentionMass over `--steps` rows of random q/K/lse (one thread): the per-step `add` (now a record of the
query row and lse) and the `fold` after the answer; with `--old FILE` (an earlier attention_mass.py, e.g.
`git show c5e18cf:apb_core/runtime/attention_mass.py > /tmp/old_mass.py`, whose `add` computed the probabilities
inside every step) the same rows through that one, and the largest relative difference of the two masses.

    python scripts/cite_mass_micro.py --old /tmp/old_mass.py
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
    """Best of three: (ms per step in add, ms of the fold, the mass)."""
    best = None
    for _ in range(3):
        mass = make()
        t0 = time.perf_counter()
        for _ in range(steps):
            for layer, (k, q) in enumerate(zip(ks, qs, strict=True)):
                mass.add(layer, q, k, lse, 0.125)
        t1 = time.perf_counter()
        if fold:
            mass.fold(lambda layer: ks[layer])
        t2 = time.perf_counter()
        run = ((t1 - t0) / steps * 1e3, (t2 - t1) * 1e3, mass.mass.clone())
        best = run if best is None or sum(run[:2]) < sum(best[:2]) else best
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--old", default=None, help="an earlier attention_mass.py to compare with")
    args = p.parse_args()
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
