"""The per-host KV cache: preallocated once, written in place (no per-token concatenation)."""

from __future__ import annotations

import torch


class HostCache:
    """K and V for every layer of one host: [L, B, Hkv, capacity, D], plus the filled length.

    After prefill a host holds the exact KV of its own block; only the last host appends the query and the
    generated tokens, so only its capacity includes room for them.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device) -> None:
        shape = (layers, 1, kv_heads, capacity, head_dim)
        # zeros, not empty: the static decode step multiplies the unfilled tail by zero weights, and 0 x NaN
        # garbage would be NaN (one memset at allocation)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens filled (same for every layer once a forward completes)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, Hkv, s, D] into positions start..start+s of `layer`."""
        end = start + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, Hkv, end, D] views (no copy) of the first `end` cached tokens of `layer`."""
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
