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

from dataclasses import dataclass, field

import torch

from apb_core.algorithm.attention import attend_after_prefix
from apb_core.algorithm.compressor import Compressor, RetainingHeads
from apb_core.algorithm.layout import HostPlan
from apb_core.algorithm.methods import PassingSpec
from apb_core.dist.comm import Comm, ProcessComm
from apb_core.runtime.attention_mass import AttentionMass
from apb_core.runtime.cache import HostCache
from apb_core.runtime.merge import merge_hosts
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
    """Query phase / decode of one step over the caches this forward attends: one host's (one host per process),
    or every host's of the process when hosts share one (apb_core.dist.local_hosts): everything but attention
    is the same on every host in decode, so one forward serves them all and their attention partials are
    merged here, as the all-gather would merge them.

    writer: the index in `caches` of the last host, which appends the new K/V (None: it is not here).
    comm: the collectives with the other processes' hosts (None: there are none). masses: --cite's
    accumulators, one per cache (None where not collecting).
    """

    caches: list[HostCache]
    writer: int | None
    comm: Comm | None = None
    masses: list[AttentionMass | None] = field(default_factory=list)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        parts = [self._local(cache, i == self.writer, layer, q, k, v, scale) for i, cache in enumerate(self.caches)]
        out, lse = merge_hosts(parts, self.comm, q.dtype)
        for mass in self.masses:
            if mass is not None:
                mass.add(layer, q, lse, scale)
        return out

    @staticmethod
    def _local(cache: HostCache, writes: bool, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One host's partial attention (out [B, Hq, s, D], lse [B, Hq, s] fp32) over its cache."""
        length = cache.length
        if writes and q.shape[2] == 1:  # one new token sees every key, itself included: one GEMV
            cache.write(layer, length, k, v)
            k_all, v_all = cache.view(layer, length + 1)
            return attention_with_lse(q, k_all, v_all, causal=False, scale=scale)
        if writes:
            cache.write(layer, length, k, v)
            k_old, v_old = cache.view(layer, length)
            return attend_after_prefix(q, k_old, v_old, k, v, scale)
        k_old, v_old = cache.view(layer, length)  # the query sits after every key of this host: no causal mask
        return attention_with_lse(q, k_old, v_old, causal=False, scale=scale)


class HostEngine:
    """One host's model, KV cache and collectives. Same code on CPU (gloo), GPU (NCCL) and for hosts that share a
    process (apb_core.dist.local_hosts); H = 1 needs none. State that lives across calls: the cache (prefill fills
    it, decode reads and extends it)."""

    def __init__(self, model, rank: int = 0, hosts: int = 1, comm: Comm | None = None,
                 retaining_heads: str | None = None, decode: str = "auto"):
        """decode: how one-token steps run: "eager" (the model's own forward per token), "static" (static shapes,
        apb_core.runtime.static_decode), "graph" (static, replayed from a CUDA graph), "auto" (graph on CUDA,
        eager on CPU, where launches cost little and the eager path reads only the filled cache).
        comm: the collectives (default: torch.distributed's default group, one host per process)."""
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)} (got {decode!r})")
        self.model = model
        self.rank, self.hosts = rank, hosts
        self.comm: Comm = comm if comm is not None else ProcessComm(rank, hosts)
        if self.comm.shares_process:  # the hosts of this process decode in one forward (decode_group)
            self.comm.register(self)
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
        self.parked: dict[str, ParkedCache] = {}  # the server's other documents' KV, by key (park/resume)
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
        call = PrefillCall(plan, strategy, self.cache, self.rank, self.hosts, self.comm, timer=timer,
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

    def collect_mass(self, layers: tuple[int, ...], rows: int) -> None:
        """From now until the next prefill, every decode step records its attention query in `layers` for
        `self.mass` (apb_core.runtime.attention_mass), up to `rows` per question (its max_new_tokens); reset it
        before each question."""
        self.mass = AttentionMass(self.context_len, layers, self.device, rows)
        self._decoder = None  # a captured step must include the accumulation

    def gather_mass(self) -> torch.Tensor | None:
        """Every host's accumulated mass, concatenated in rank order, [context tokens] on CPU (a collective:
        every host calls it); None when collect_mass was not called."""
        if self.mass is None:
            return None
        block_len = self.mass.block_len
        self.mass.fold(lambda layer: self.cache.view(layer, block_len)[0])
        return self.mass.gather(self.hosts, self.comm)

    def _block_rope(self, plan: HostPlan, pos: torch.Tensor, passing: PassingSpec):
        """RoPE cos/sin [B, n, D] of the block's positions: the retaining heads read pre-RoPE q and k."""
        if self.heads is None or passing.exact or passing.scorer != "retaining_heads":
            return None
        block_pos = pos[:, plan.kept].to(self.device)
        dummy = torch.empty(1, dtype=self.dtype, device=self.device)
        return self.model.model.rotary_emb(dummy, block_pos)

    def decode_group(self) -> tuple[list[HostEngine], Comm | None]:
        """The engines whose caches this engine's decode forward attends, and the collectives with the rest:
        itself and its process group, or, for hosts that share a process, all of them (local host 0 runs the
        one forward: `_lead`) and the group of the worker processes (None when there is one)."""
        if self.comm.shares_process:
            return self.comm.shared.engines, self.comm.shared.outer
        return [self], (self.comm if self.hosts > 1 else None)

    def decode_call(self) -> DecodeCall:
        engines, comm = self.decode_group()
        writer = next((i for i, e in enumerate(engines) if e.is_last), None)
        return DecodeCall([e.cache for e in engines], writer, comm, [e.mass for e in engines])

    def _lead(self, forward):
        """forward() -> logits, run once for the hosts of this process (by local host 0 when they share one)."""
        return self.comm.lead(forward) if self.comm.shares_process else forward()

    def step(self, ids: list[int], start_pos: int) -> torch.Tensor:
        """Query phase / decode: run `ids` at positions start_pos.. on every host; returns last-token logits [V]."""
        def forward() -> torch.Tensor:  # once per process (`_lead`): the input tensors only where it runs
            t = torch.tensor([ids], dtype=torch.long, device=self.device)
            pos = torch.arange(start_pos, start_pos + len(ids), device=self.device).unsqueeze(0)
            return self.forward_logits(t, pos, self.decode_call())

        logits = self._lead(forward)
        if self.is_last:
            self.cache.length += len(ids)
        return logits

    def step_token(self, token: int, pos: int) -> torch.Tensor:
        """One generated token at position `pos` on every host, in this engine's decode mode; logits [V] fp32
        (with static or graph decode, a buffer the next step overwrites)."""
        if self.decode_mode == "eager":
            return self.step([token], pos)

        def static_step() -> torch.Tensor:
            if self._decoder is None:
                self._decoder = StaticDecoder(self, graph=self.decode_mode == "graph")
            return self._decoder.step(token, pos)

        logits = self._lead(static_step)
        if self.is_last:
            self.cache.length += 1
        return logits

    def broadcast_token(self, token: int) -> int:
        """The last host's token, on every host (the one collective of a decode step outside the layers)."""
        if self.hosts == 1:
            return token
        t = torch.tensor([token], dtype=torch.long, device=self.device)
        self.comm.broadcast(t, src=self.hosts - 1)
        return int(t.item())

    def release(self) -> None:
        """Drop the KV cache and the decode graph (the next prefill allocates what it needs)."""
        self.cache = None
        self._decoder = None

    # The server's document cache (apb_core.serve.cache decides, apb_core.runtime.reuse.ServeJob tells every
    # host): several documents' KV kept aside by key. Only the launcher chooses keys and evictions, so every
    # host parks, resumes and drops the same keys; a new worker starts with none.

    def park(self, key: str) -> None:
        """Set the current cache (the document's KV, rewound) aside under `key`; no cache is current afterwards,
        so the next prefill allocates its own instead of overwriting this one. The decode graph goes with it
        (it reads these buffers; kept so that a resumed cache replays without a new capture) unless it
        accumulates citation mass, which belongs to one question."""
        if self.cache is None:
            raise RuntimeError(f"nothing to park under {key[:12]}: no KV cache")
        self.rewind()
        decoder = self._decoder if self.mass is None else None
        self.parked[key] = ParkedCache(self.cache, self.context_len, decoder)
        self.cache, self.context_len, self._decoder, self.mass = None, 0, None, None

    def resume(self, key: str) -> None:
        """Make the cache parked under `key` current again (taken out of `parked`: park it back afterwards);
        whatever cache was current is released. KeyError when no such key is parked."""
        entry = self.parked.pop(key)
        self.cache, self.context_len, self._decoder, self.mass = entry.cache, entry.context_len, entry.decoder, None

    def drop(self, key: str) -> None:
        """Free the cache parked under `key` (an eviction); nothing when there is none."""
        self.parked.pop(key, None)


@dataclass
class ParkedCache:
    """A document's KV set aside by HostEngine.park: the cache, its block length and its decode step."""

    cache: HostCache
    context_len: int
    decoder: StaticDecoder | None = None
