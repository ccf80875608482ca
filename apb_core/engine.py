"""The APB engine of one host: a transformers model whose attention is replaced at one registration point.

We register an attention function named "apb" with transformers' `AttentionInterface` (and a mask function
that builds nothing: APB never needs an N×N mask). The model's own modules compute projections, RoPE from the
position ids we pass, norms and MLPs; our function receives post-RoPE q, k, v per layer and does the
distributed part: cache the block's KV, compress and all-gather the passing block, APB-mask attention
(prefill), or local attention + log-sum-exp merge across hosts (query phase and decode).
H = 1 with no anchor and no passing is plain causal attention.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from apb_core.attention import apb_attention, attend_after_prefix, merge_partials
from apb_core.cache import HostCache
from apb_core.compressor import RetainingHeads, query_aware_scores, random_scores, select_top
from apb_core.layout import HostPlan
from apb_core.passing import all_gather_packed, exchange_passing
from kernels import attention_with_lse

ATTN_NAME = "apb"
_ACTIVE: HostEngine | None = None  # the engine whose forward is running in this process


def _apb_attention_hook(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: q [B, Hq, S, D], k, v [B, Hkv, S, D] post-RoPE -> ([B, S, Hq, D], None)."""
    engine = _ACTIVE
    if engine is None:
        raise RuntimeError("apb attention called outside an APB engine forward")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = engine.attend(module.layer_idx, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def register_attention() -> str:
    """Register the "apb" attention (idempotent) and return its name for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _apb_attention_hook)
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
class PassingSpec:
    """How host blocks are compressed: `keep` tokens per host ("all" = exact, 0 = no passing),
    `scorer` in {"query_aware", "retaining_heads", "random"}."""

    keep: int | str = 0
    scorer: str = "query_aware"
    seed: int = 0

    def counts(self, block_lens: list[int]) -> list[int]:
        if self.keep == "all":
            return list(block_lens)
        return [min(int(self.keep), n) for n in block_lens]

    @property
    def active(self) -> bool:
        return self.keep == "all" or int(self.keep) > 0


def _unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: x [B, H, n, D] rotated with cos/sin [B, n, D] -> pre-RoPE projection."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos - rot * sin) / (cos * cos + sin * sin)


class HostEngine:
    """One host's model, cache and communication. Same code on CPU (gloo) and GPU (NCCL); H = 1 needs no group."""

    def __init__(self, model, rank: int = 0, hosts: int = 1, group=None, retaining_heads: str | None = None):
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
        self.phase = "idle"
        self.plan: HostPlan | None = None
        self.passing = PassingSpec()
        self.counts: list[int] = []
        self.on_layer: Callable[[int], None] | None = None
        # prefill attention strategy: (engine, layer, q, k, v, scale) -> out; APB by default. Baselines (ring,
        # Ulysses) plug in here with their own plans; the cache write and decode stay the same.
        self.prefill_op: Callable[..., torch.Tensor] = apb_prefill_op
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.passing_received = 0
        use_apb_attention(model)

    @property
    def is_last(self) -> bool:
        return self.rank == self.hosts - 1

    # ---- forward passes -------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, logits: bool) -> torch.Tensor | None:
        global _ACTIVE
        _ACTIVE = self
        try:
            with torch.inference_mode():
                ids, pos = ids.to(self.device), pos.to(self.device)
                if not logits:  # prefill: hidden states only, no LM head at all
                    self.model.model(input_ids=ids, position_ids=pos, use_cache=False)
                    return None
                out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1)
                return out.logits[0, -1].float()
        finally:
            _ACTIVE = None

    def prefill(self, plan: HostPlan, context_ids: list[int], passing: PassingSpec, block_lens: list[int],
                reserve: int = 0) -> None:
        """Run this host's prefill; afterwards the cache holds the exact KV of its block.

        `reserve`: extra cache room on the last host for the query part and the generated tokens.
        """
        self.plan, self.passing = plan, passing
        self.counts = passing.counts(block_lens) if self.hosts > 1 else []
        capacity = plan.block_len + (reserve if self.is_last else 0)
        if self.cache is None or self.cache.capacity < capacity:
            self.cache = HostCache(self.layers, self.kv_heads, self.head_dim, capacity, self.dtype, self.device)
        self.cache.length = 0
        self.passing_received = sum(self.counts[: self.rank]) if passing.active else 0
        ids, pos = plan.input_ids(context_ids), plan.position_ids()
        self._rope = None
        if self.heads is not None and passing.active and passing.keep != "all":
            a, n = plan.anchor_len, plan.block_len
            block_pos = pos[:, a : a + n].to(self.device)
            dummy = torch.empty(1, dtype=self.dtype, device=self.device)
            self._rope = self.model.model.rotary_emb(dummy, block_pos)
        self.phase = "prefill"
        try:
            self._forward(ids, pos, logits=False)
        finally:
            self.phase = "idle"
        self.cache.length = plan.block_len

    def step(self, ids: list[int], start_pos: int) -> torch.Tensor:
        """Query phase / decode: run `ids` at positions start_pos.. on every host; returns last-token logits [V]."""
        t = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(start_pos, start_pos + len(ids)).unsqueeze(0)
        self.phase = "decode"
        try:
            logits = self._forward(t, pos, logits=True)
        finally:
            self.phase = "idle"
        if self.is_last:
            self.cache.length += len(ids)
        return logits

    # ---- the attention hook ---------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.phase == "prefill":
            out = self._prefill_attention(layer, q, k, v, scale)
        else:
            out = self._decode_attention(layer, q, k, v, scale)
        if self.on_layer is not None:
            self.on_layer(layer)
        return out

    def _prefill_attention(self, layer, q, k, v, scale) -> torch.Tensor:
        a, n = self.plan.anchor_len, self.plan.block_len
        self.cache.write(layer, 0, k[:, :, a : a + n], v[:, :, a : a + n])
        return self.prefill_op(self, layer, q, k, v, scale)

    def _compress(self, layer, q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """This host's selected K|V, [B, Hkv, slot, D] each, padded to the largest host's count."""
        plan = self.plan
        a, n = plan.anchor_len, plan.block_len
        slot = max(self.counts)
        k_blk, v_blk = k[:, :, a : a + n], v[:, :, a : a + n]
        keep = self.counts[self.rank]
        if self.is_last:  # nobody receives the last host's block
            k_sel, v_sel = k_blk[:, :, :0], v_blk[:, :, :0]
        elif self.passing.keep == "all":
            k_sel, v_sel = k_blk, v_blk
        else:
            scores = self._scores(layer, q, k_blk, v_blk, scale)
            idx = select_top(scores, keep).unsqueeze(0).unsqueeze(-1).expand(1, -1, -1, k.shape[-1])
            k_sel, v_sel = k_blk.gather(2, idx), v_blk.gather(2, idx)
        pad = slot - k_sel.shape[2]
        if pad:
            k_sel = torch.cat([k_sel, k_sel.new_zeros(*k_sel.shape[:2], pad, k_sel.shape[3])], dim=2)
            v_sel = torch.cat([v_sel, v_sel.new_zeros(*v_sel.shape[:2], pad, v_sel.shape[3])], dim=2)
        return k_sel, v_sel

    def _scores(self, layer, q, k_blk, v_blk, scale) -> torch.Tensor:
        plan = self.plan
        a, n = plan.anchor_len, plan.block_len
        scorer = self.passing.scorer
        if scorer == "random":
            digest = hashlib.sha256(f"{self.passing.seed}/{layer}/{self.rank}".encode()).digest()
            return random_scores(n, self.kv_heads, int.from_bytes(digest[:8], "little"), q.device)
        if scorer == "retaining_heads":
            if self.heads is None:
                raise RuntimeError("the retaining_heads scorer needs a retaining heads file")
            cos, sin = self._rope
            q_raw = _unrotate(q[:, :, a : a + n].float(), cos.float(), sin.float())
            k_raw = _unrotate(k_blk.float(), cos.float(), sin.float())
            return self.heads.scores(layer, q_raw.to(self.dtype), k_raw.to(self.dtype), v_blk)
        if plan.probe_len == 0:
            raise RuntimeError("the query-aware scorer needs the question probe in the layout")
        return query_aware_scores(q[:, :, a + n :], k_blk, scale)

    def _decode_attention(self, layer, q, k, v, scale) -> torch.Tensor:
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
            return out
        packed = torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1)  # [B, Hq, s, D+1]
        gathered = all_gather_packed(packed, self.hosts, self.group)  # [H, B, Hq, s, D+1]
        merged, _ = merge_partials([g[..., :-1] for g in gathered], [g[..., -1] for g in gathered])
        return merged.to(q.dtype)


def apb_prefill_op(engine: HostEngine, layer: int, q, k, v, scale: float) -> torch.Tensor:
    """APB prefill attention of one layer: compress, all-gather the passing block, APB-mask attention."""
    k_pass = v_pass = None
    if engine.hosts > 1 and engine.passing.active:
        k_sel, v_sel = engine._compress(layer, q, k, v, scale)
        k_pass, v_pass = exchange_passing(k_sel, v_sel, engine.counts, engine.rank, engine.group)
    return apb_attention(q, k, v, engine.plan.anchor_len, k_pass, v_pass, scale)


def exact_barrier(group=None) -> None:
    """A barrier that works on gloo and NCCL alike (used to time phases across hosts)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
