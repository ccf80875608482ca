"""One prefill's state, and APB's prefill strategy.

A prefill strategy is the attention of one layer during prefill, with one signature for every method
(ring-flash-attention's habit: interchangeable variants, one call shape):

    strategy(call: PrefillCall, layer, q [B, Hq, S, D], k, v [B, Hkv, S, D], scale) -> out [B, Hq, S, D]

`apb_prefill` (below) serves apb, star and full (exact: every earlier token passed); ring and Ulysses live in
apb_core.baselines. The engine builds a `PrefillCall` for each prefill and hands it to the attention hook
through the model's forward kwargs: no engine is ever looked up through a global.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from apb_core.algorithm.attention import apb_attention
from apb_core.algorithm.compressor import Compressor
from apb_core.algorithm.passing import exchange_passing
from apb_core.dist.comm import Comm
from apb_core.runtime.cache import HostCache
from apb_core.runtime.timing import NO_TIMER, PhaseTimer


class Plan(Protocol):
    """What a host prefills: HostPlan (apb/star/full), ZigzagPlan (ring), BlockPlan (Ulysses)."""

    @property
    def block_len(self) -> int: ...  # context tokens whose KV this host keeps

    @property
    def kept(self) -> slice: ...  # where they sit in the prefill sequence

    def input_ids(self, context_ids: list[int]) -> torch.Tensor: ...  # [1, S]

    def position_ids(self) -> torch.Tensor: ...  # [1, S]


Strategy = Callable[["PrefillCall", int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass
class PrefillCall:
    """Everything one host's prefill attention needs, for one prefill.

    compressor: None when this method passes nothing (star, ring, Ulysses, one host). counts: tokens every
    host passes (per KV head). passing_received: tokens this host receives in each layer's passing block.
    """

    plan: Any  # a Plan
    strategy: Strategy
    cache: HostCache
    rank: int = 0
    hosts: int = 1
    comm: Comm | None = None  # None for one host
    compressor: Compressor | None = None
    counts: tuple[int, ...] = ()
    timer: PhaseTimer = NO_TIMER
    on_layer: Callable[[int], None] | None = None

    @property
    def passing_received(self) -> int:
        return sum(self.counts[: self.rank]) if self.compressor is not None else 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        kept = self.plan.kept
        self.cache.write(layer, 0, k[:, :, kept], v[:, :, kept])
        with self.timer.region("attention"):  # nested regions (compress, all-gather, ...) are subtracted
            out = self.strategy(self, layer, q, k, v, scale)
        if self.on_layer is not None:
            self.on_layer(layer)
        return out


def apb_prefill(call: PrefillCall, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
    """APB prefill attention of one layer: compress, all-gather the passing block, APB-mask attention."""
    k_pass = v_pass = None
    if call.compressor is not None:
        with call.timer.region("compress"):
            k_sel, v_sel = call.compressor.select(layer, q, k, v, scale)
        if call.timer.enabled:  # breakdown mode: the hosts' imbalance, kept out of the all-gather's time
            with call.timer.region("wait"):
                call.comm.barrier()
        with call.timer.region("all-gather"):
            k_pass, v_pass = exchange_passing(k_sel, v_sel, list(call.counts), call.rank, call.comm)
    return apb_attention(q, k, v, call.plan.anchor_len, k_pass, v_pass, scale)
