"""The FLOP model: what a prefill costs per token and per query-key pair, and what each host of a layout runs.

Used by `apb bench` (effective / executed TFLOP/s) and by the layout defaults: at short contexts APB's anchor
(tokens every host h > 0 runs through QKV and the MLP a second time) can cost more than passing every earlier
token uncompressed, which is exact. `last_host_flops` lets the defaults pick the exact layout there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kernels.apb_mask import apb_pairs


@dataclass(frozen=True)
class ModelDims:
    """The shapes the FLOP model needs, read from a transformers config."""

    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: Any) -> ModelDims:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                   cfg.num_key_value_heads, head_dim, cfg.vocab_size)

    @property
    def linear_flops_per_token(self) -> float:
        """2 x the projection and MLP weights of all layers (LM head excluded: prefill computes no logits)."""
        qkv = self.hidden * (self.q_heads + 2 * self.kv_heads) * self.head_dim
        o = self.q_heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return 2.0 * (qkv + o + mlp) * self.layers

    @property
    def attention_flops_per_pair(self) -> float:
        """QKᵀ and PV for one query-key pair, every head, every layer."""
        return 4.0 * self.q_heads * self.head_dim * self.layers

    def exact_flops(self, n: int) -> float:
        """Causal prefill of n tokens: the exact-equivalent work every method is credited with."""
        return self.linear_flops_per_token * n + self.attention_flops_per_pair * n * (n + 1) / 2


def last_host_flops(dims: ModelDims, context_len: int, hosts: int, anchor_len: int, passing_len: int | str) -> float:
    """Prefill FLOPs of the last host (the busiest: it receives every earlier host's passing block).

    Tokens run: anchor + block. Pairs: the anchor causally, then each block token over the anchor, the passing
    blocks of the H-1 earlier hosts and its own block causally. `passing_len` "all" is the exact layout.
    """
    block = math.ceil(context_len / hosts)
    passing = block if passing_len == "all" else min(int(passing_len), block)
    pairs = apb_pairs(anchor_len, (hosts - 1) * passing, block)
    return dims.linear_flops_per_token * (anchor_len + block) + dims.attention_flops_per_pair * pairs
