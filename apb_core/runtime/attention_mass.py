"""Attention mass for citations (`apb ask --cite`): how much of each answer token's attention fell on each
cached context token, collected by the decode itself (no second forward pass).

What is summed, and why:
- rows: the query phase's last row (it predicts the first answer token) and every decode step, i.e. the
  positions that predicted each answer token (and the end of the answer);
- layers: the upper quarter (`CITE_LAYER_FRACTION`): retrieval heads that copy from the context live in the
  middle and upper layers, while the lower layers attend mostly to nearby tokens and to the attention sink
  (docs/quality.md, "Citations", compares the choices);
- heads: summed (GQA: the query heads of each KV head read the same keys);
- keys: this host's block only (the first `block_len` cache slots). The last host's query part and answer
  tokens are not context; host 0's chat-template head is dropped later, when masses become passages.
Each term is a softmax probability under the *merged* log-sum-exp of all hosts, exp(q·k·scale − lse_merged)
= exp(q·k·scale − lse_host) · exp(lse_host − lse_merged): each host's local probabilities weighted by its
share of the softmax, so masses of all hosts add up to the true attention of the whole sequence. Every host
accumulates into a fixed [block_len] buffer (static shapes: capturable in the CUDA decode graph); one
all-gather after the answer brings the blocks together.
"""

from __future__ import annotations

import torch

CITE_LAYER_FRACTION = 0.25  # the upper quarter of the layers


def cite_layers(layers: int, fraction: float = CITE_LAYER_FRACTION) -> tuple[int, ...]:
    """The layers whose attention counts: the last max(1, round(fraction * layers)) (1.0: all layers)."""
    n = min(layers, max(1, round(fraction * layers)))
    return tuple(range(layers - n, layers))


class AttentionMass:
    """One host's accumulated attention mass per block token: `mass` [block_len] fp32, on the engine's device."""

    def __init__(self, block_len: int, layers: tuple[int, ...], device) -> None:
        self.block_len = block_len
        self.layers = frozenset(layers)
        self.mass = torch.zeros(block_len, dtype=torch.float32, device=device)

    def reset(self) -> None:
        """Zero the buffer in place (a captured decode graph keeps writing into the same tensor)."""
        self.mass.zero_()

    def add(self, layer: int, q: torch.Tensor, k_block: torch.Tensor, lse: torch.Tensor, scale: float) -> None:
        """Add the last query row's attention probabilities over the block keys, summed over heads.

        q [B, Hq, s, D] post-RoPE; k_block [B, Hkv, block_len, D]; lse [B, Hq, s] fp32, merged over every host.
        """
        if layer not in self.layers or self.block_len == 0:
            return
        b, hq, _, d = q.shape
        hkv = k_block.shape[1]
        q_g = q[:, :, -1].reshape(b, hkv, hq // hkv, d).to(k_block.dtype)  # query head i reads KV head i // G
        logits = torch.matmul(q_g, k_block.transpose(-1, -2)).float() * scale  # [B, Hkv, G, block_len]
        probs = torch.exp(logits - lse[:, :, -1].reshape(b, hkv, hq // hkv, 1))
        self.mass += probs.sum(dim=(0, 1, 2))

    def gather(self, hosts: int, comm=None) -> torch.Tensor:
        """Every host's buffer, concatenated in rank order, on CPU: [sum of block_len] (two all-gathers over
        `comm`, apb_core.dist.comm: the block lengths, then the buffers padded to the longest)."""
        local = self.mass.detach()
        if hosts == 1:
            return local.cpu()
        sizes = comm.all_gather(torch.tensor([self.block_len], dtype=torch.long, device=local.device))  # [H, 1]
        lens = [int(s) for s in sizes.view(-1).tolist()]
        padded = local.new_zeros(max(lens))
        padded[: self.block_len] = local
        parts = comm.all_gather(padded)  # [H, max block]
        return torch.cat([p[:n] for p, n in zip(parts, lens, strict=True)]).cpu()
