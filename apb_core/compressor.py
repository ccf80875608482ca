"""Compressor: per layer and KV head, score the block's tokens and keep the top l_p for the passing block.

Scores are smoothed by a max-pool of width 5 along the sequence (paper), then `topk` per KV head; indices are
returned in position order (the passing block is fully visible, so order does not change the result, but a
stable order makes runs reproducible). Scorers (pluggable):
- `query_aware` (default, training-free): the question's query vectors (the probe rows, at their query-phase
  positions) attend to the block's keys; score = attention probability summed over the question tokens and the
  GQA group of each KV head, in fp32 (SnapKV/Spava-style). Every host, host 0 included, has the probe.
- `retaining_heads`: Locret-style MLP heads `fc2(act(fc1([q|k|v])))` on the pre-RoPE projections, loaded from a
  safetensors file (keys `layers.{i}.fc1.weight`, `layers.{i}.fc2.weight`, optionally prefixed).
- `random`: uniform scores from a seeded generator (ablations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

POOL_WIDTH = 5


def select_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores [Hkv, n] -> indices [Hkv, keep] of the kept tokens per KV head, in position order."""
    n = scores.shape[-1]
    keep = min(keep, n)
    pooled = F.max_pool1d(scores.float().unsqueeze(0), POOL_WIDTH, stride=1, padding=POOL_WIDTH // 2).squeeze(0)
    idx = torch.topk(pooled, keep, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def query_aware_scores(q_probe: torch.Tensor, k_block: torch.Tensor, scale: float) -> torch.Tensor:
    """q_probe [B, Hq, p, D] (post-RoPE, query-phase positions), k_block [B, Hkv, n, D] -> scores [Hkv, n]."""
    hkv = k_block.shape[1]
    b, hq, p, d = q_probe.shape
    qg = q_probe[0].float().view(hkv, hq // hkv, p, d)  # [Hkv, g, p, D]
    logits = torch.einsum("hgpd,hnd->hgpn", qg, k_block[0].float()) * scale
    return torch.softmax(logits, dim=-1).sum(dim=(1, 2))  # [Hkv, n]


def random_scores(n: int, hkv: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(hkv, n, generator=gen).to(device)


@dataclass
class RetainingHeads:
    """Locret retaining heads for every layer: fc1 [hidden, (Hq+2Hkv)·D], fc2 [Hkv, hidden]."""

    fc1: list[torch.Tensor]
    fc2: list[torch.Tensor]

    @classmethod
    def load(cls, path: str, num_layers: int, device, dtype) -> RetainingHeads:
        from safetensors.torch import load_file

        tensors = load_file(path)

        def find(layer: int, name: str) -> torch.Tensor:
            for key, value in tensors.items():
                if key.endswith(f"layers.{layer}.{name}.weight") or key.endswith(
                    f"layers.{layer}.self_attn.{name}.weight"
                ):
                    return value.to(device=device, dtype=dtype)
            raise KeyError(f"retaining heads file {path} has no weight for layer {layer} {name}")

        return cls([find(i, "fc1") for i in range(num_layers)], [find(i, "fc2") for i in range(num_layers)])

    def scores(self, layer: int, q_raw: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE q [B, Hq, n, D], k, v [B, Hkv, n, D] -> scores [Hkv, n] (SiLU between the two layers)."""
        feats = torch.cat([t[0].transpose(0, 1).flatten(1) for t in (q_raw, k_raw, v)], dim=-1)  # [n, F]
        hidden = F.silu(feats @ self.fc1[layer].T)
        return (hidden @ self.fc2[layer].T).T.float()  # [Hkv, n]
