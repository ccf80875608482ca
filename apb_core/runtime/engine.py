"""The engine of one host: a transformers model whose attention is replaced at one registration point.

We register an attention function named "apb" with transformers' `AttentionInterface` (and a mask function
that builds nothing: APB never needs an N×N mask). The model's own modules compute projections, RoPE from the
position ids we pass, norms and MLPs; our function receives post-RoPE q, k, v per layer and does the
distributed part. Which part is decided by the call object passed down the forward as the `apb_call` kwarg
(transformers hands unknown forward kwargs to the attention function):
- `PrefillCall` (apb_core.runtime.prefill): cache the block's KV and run the method's prefill strategy;
- `DecodeCall` (below): the query phase and decode, local attention over this host's cache and a
  log-sum-exp merge across hosts.
H = 1 with no anchor and no passing is plain causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from apb_core.algorithm.attention import attend_after_prefix, merge_partials
from apb_core.algorithm.compressor import Compressor, RetainingHeads
from apb_core.algorithm.layout import HostPlan
from apb_core.algorithm.methods import PassingSpec
from apb_core.algorithm.passing import all_gather_packed
from apb_core.runtime.attention_mass import AttentionMass
from apb_core.runtime.cache import HostCache
from apb_core.runtime.prefill import PrefillCall, Strategy, apb_prefill
from apb_core.runtime.static_decode import StaticDecoder
from apb_core.runtime.timing import NO_TIMER, PhaseTimer
from kernels import attention_with_lse

ATTN_NAME = "apb"
DECODE_MODES = ("auto", "eager", "static", "graph")


def apb_attention_hook(module, query, key, value, attention_mask, scaling=None, dropout=0.0, apb_call=None,
                       **kwargs):
    """transformers attention function: q [B, Hq, S, D], k, v [B, Hkv, S, D] post-RoPE -> ([B, S, Hq, D], None)."""
    if apb_call is None:
        raise RuntimeError("the apb attention runs only inside HostEngine.prefill or HostEngine.step")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = apb_call.attend(module.layer_idx, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def register_attention() -> str:
    """Register the "apb" attention (idempotent) and return its name for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, apb_attention_hook)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    return ATTN_NAME


def use_apb_attention(model) -> None:
    """Switch a loaded transformers model to the "apb" attention function."""
    register_attention()
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(ATTN_NAME)
            return
        except (ValueError, TypeError):
            pass
    model.config._attn_implementation = ATTN_NAME


@dataclass
class DecodeCall:
    """Query phase / decode of one step: every host attends its cache; only the last host appends new KV."""

    cache: HostCache
    hosts: int
    is_last: bool
    group: Any = None
    mass: AttentionMass | None = None  # --cite: accumulates the attention over the block's keys

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        length = self.cache.length
        if self.is_last and q.shape[2] == 1:  # one new token sees every key, itself included: one GEMV
            self.cache.write(layer, length, k, v)
            k_all, v_all = self.cache.view(layer, length + 1)
            out, lse = attention_with_lse(q, k_all, v_all, causal=False, scale=scale)
        elif self.is_last:
            self.cache.write(layer, length, k, v)
            k_old, v_old = self.cache.view(layer, length)
            out, lse = attend_after_prefix(q, k_old, v_old, k, v, scale)
        else:  # the query sits after every key of this host: no causal mask
            k_old, v_old = self.cache.view(layer, length)
            out, lse = attention_with_lse(q, k_old, v_old, causal=False, scale=scale)
        if self.hosts == 1:
            if self.mass is not None:
                self.mass.add(layer, q, self.cache.view(layer, self.mass.block_len)[0], lse, scale)
            return out
        packed = torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1)  # [B, Hq, s, D+1]
        gathered = all_gather_packed(packed, self.hosts, self.group)  # [H, B, Hq, s, D+1]
        merged, lse_all = merge_partials([g[..., :-1] for g in gathered], [g[..., -1] for g in gathered])
        if self.mass is not None:
            self.mass.add(layer, q, self.cache.view(layer, self.mass.block_len)[0], lse_all, scale)
        return merged.to(q.dtype)


class HostEngine:
    """One host's model, KV cache and process group. Same code on CPU (gloo) and GPU (NCCL); H = 1 needs no
    group. State that lives across calls: the cache (prefill fills it, decode reads and extends it)."""

    def __init__(self, model, rank: int = 0, hosts: int = 1, group=None, retaining_heads: str | None = None,
                 decode: str = "auto"):
        """decode: how one-token steps run: "eager" (the model's own forward per token), "static" (static shapes,
        apb_core.runtime.static_decode), "graph" (static, replayed from a CUDA graph), "auto" (graph on CUDA,
        eager on CPU, where launches cost little and the eager path reads only the filled cache)."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)} (got {decode!r})")
        self.model = model
        self.rank, self.hosts, self.group = rank, hosts, group
        cfg = model.config
        self.layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.heads = (
            RetainingHeads.load(retaining_heads, self.layers, self.device, self.dtype) if retaining_heads else None
        )
        self.cache: HostCache | None = None
        self.context_len = 0  # the block's tokens in the cache after prefill (rewind goes back to it)
        if decode == "auto":
            decode = "graph" if self.device.type == "cuda" else "eager"
        self.decode_mode = decode
        self._decoder: StaticDecoder | None = None  # built at the first token after a prefill
        self.mass: AttentionMass | None = None  # --cite: set after a prefill by collect_mass
        use_apb_attention(model)

    @property
    def is_last(self) -> bool:
        return self.rank == self.hosts - 1

    def forward_logits(self, ids: torch.Tensor, pos: torch.Tensor, call) -> torch.Tensor:
        """One forward of ids, pos [1, S] (on this device) with `call` as the attention; last-token logits [V] fp32."""
        with torch.inference_mode():
            out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1, apb_call=call)
            return out.logits[0, -1].float()

    def prefill(self, plan, context_ids: list[int], strategy: Strategy = apb_prefill,
                passing: PassingSpec | None = None, block_lens: list[int] | None = None, reserve: int = 0,
                timer: PhaseTimer = NO_TIMER, on_layer=None) -> PrefillCall:
        """Run this host's prefill of `plan` with `strategy`; afterwards the cache holds the exact KV of its block.

        passing/block_lens: what APB's strategy passes (every host's block length sets the counts);
        reserve: extra cache room on the last host for the query part and the generated tokens.
        Returns the call (what was passed, received, timed).
        """
        capacity = plan.block_len + (reserve if self.is_last else 0)
        self._decoder = None  # its graph and buffers belong to the old cache
        self.mass = None
        if self.cache is None or self.cache.capacity < capacity:
            self.cache = None  # free the old buffers before the new ones are allocated
            self.cache = HostCache(self.layers, self.kv_heads, self.head_dim, capacity, self.dtype, self.device)
        self.cache.length = 0
        call = PrefillCall(plan, strategy, self.cache, self.rank, self.hosts, self.group, timer=timer,
                           on_layer=on_layer)
        ids, pos = plan.input_ids(context_ids), plan.position_ids()
        if passing is not None and passing.active and self.hosts > 1:
            call.counts = tuple(passing.counts(block_lens or []))
            call.compressor = Compressor(passing, plan, list(call.counts), self.heads,
                                         self._block_rope(plan, pos, passing))
        with torch.inference_mode():  # hidden states only: prefill needs no LM head at all
            self.model.model(input_ids=ids.to(self.device), position_ids=pos.to(self.device), use_cache=False,
                             apb_call=call)
        self.cache.length = plan.block_len
        self.context_len = plan.block_len
        return call

    def rewind(self) -> None:
        """Forget the query part and the generated tokens: the cache holds the block's KV again, as prefill left
        it, so the next question over the same prefill sees none of the last one's. Only the last host ever
        appended; a static decoder stays valid (it reads the cache's buffers in place and refills its length
        tensor from cache.length at every step; stale K/V past the length is masked out)."""
        if self.cache is not None:
            self.cache.length = self.context_len

    def collect_mass(self, layers: tuple[int, ...]) -> None:
        """From now until the next prefill, every decode step adds its attention over the block's keys in
        `layers` to `self.mass` (apb_core.runtime.attention_mass); reset it before each question."""
        self.mass = AttentionMass(self.context_len, layers, self.device)
        self._decoder = None  # a captured step must include the accumulation

    def gather_mass(self) -> torch.Tensor | None:
        """Every host's accumulated mass, concatenated in rank order, [context tokens] on CPU (a collective:
        every host calls it); None when collect_mass was not called."""
        return None if self.mass is None else self.mass.gather(self.hosts, self.group)

    def _block_rope(self, plan: HostPlan, pos: torch.Tensor, passing: PassingSpec):
        """RoPE cos/sin [B, n, D] of the block's positions: the retaining heads read pre-RoPE q and k."""
        if self.heads is None or passing.exact or passing.scorer != "retaining_heads":
            return None
        block_pos = pos[:, plan.kept].to(self.device)
        dummy = torch.empty(1, dtype=self.dtype, device=self.device)
        return self.model.model.rotary_emb(dummy, block_pos)

    def step(self, ids: list[int], start_pos: int) -> torch.Tensor:
        """Query phase / decode: run `ids` at positions start_pos.. on every host; returns last-token logits [V]."""
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(start_pos, start_pos + len(ids), device=self.device).unsqueeze(0)
        logits = self.forward_logits(t, pos, DecodeCall(self.cache, self.hosts, self.is_last, self.group, self.mass))
        if self.is_last:
            self.cache.length += len(ids)
        return logits

    def step_token(self, token: int, pos: int) -> torch.Tensor:
        """One generated token at position `pos` on every host, in this engine's decode mode; logits [V] fp32
        (with static or graph decode, a buffer the next step overwrites)."""
        if self.decode_mode == "eager":
            return self.step([token], pos)
        if self._decoder is None:
            self._decoder = StaticDecoder(self, graph=self.decode_mode == "graph")
        return self._decoder.step(token, pos)

    def broadcast_token(self, token: int) -> int:
        """The last host's token, on every host (the one collective of a decode step outside the layers)."""
        if self.hosts == 1:
            return token
        t = torch.tensor([token], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=self.hosts - 1, group=self.group)
        return int(t.item())

    def release(self) -> None:
        """Drop the KV cache and the decode graph (the next prefill allocates what it needs)."""
        self.cache = None
        self._decoder = None
