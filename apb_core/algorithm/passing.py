"""Passing: all-gather every host's compressed K|V; host h keeps the blocks of hosts < h, in host order.

One all-gather (apb_core.dist.comm) per layer of a packed [Hkv, l_p, 2D] tensor. Hosts with fewer kept tokens (a
short block in exact mode) pad their slot; the receiver slices each slot to the sender's true count, which
every host knows from the layout. Passing KV lives only inside this layer's attention: it is never cached.
"""

from __future__ import annotations

import torch

from apb_core.dist.comm import Comm


def exchange_passing(
    k_sel: torch.Tensor, v_sel: torch.Tensor, counts: list[int], rank: int, comm: Comm
) -> tuple[torch.Tensor, torch.Tensor]:
    """k_sel, v_sel [B, Hkv, slot, D] (padded to the largest count) -> passing K, V [B, Hkv, sum(counts[:rank]), D]."""
    d = k_sel.shape[-1]
    gathered = comm.all_gather(torch.cat([k_sel, v_sel], dim=-1))  # [H, B, Hkv, slot, 2D]
    blocks = [gathered[h, :, :, : counts[h]] for h in range(rank)]
    if not blocks:
        empty = k_sel[:, :, :0]
        return empty, v_sel[:, :, :0]
    packed = torch.cat(blocks, dim=2)
    return packed[..., :d], packed[..., d:]
