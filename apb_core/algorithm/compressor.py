"""Compressor: per layer and KV head, score the block's tokens and keep the top l_p for the passing block.

Scores are smoothed by a max-pool of width 5 along the sequence (paper), then the top l_p per KV head; indices are
returned in position order (the passing block is fully visible, so order does not change the result, but a
stable order makes runs reproducible). The pool makes plateaus (a peak's value covers 5 tokens), so ties at the
cut are the rule, not the exception: they go to the earlier token (a stable descending sort), the same on every
device, instead of wherever `torch.topk` happens to leave them. Scorers (pluggable):
- `query_aware` (default, training-free): the question's query vectors (the probe rows, at their query-phase
  positions) attend to the block's keys; score = attention probability summed over the question tokens and the
  GQA group of each KV head, in fp32 (SnapKV/Spava-style). Every host, host 0 included, has the probe.
  Several questions over one prefill: each question scores the block on its own (mean over its tokens, so a
  long question does not outweigh a short one), and a token keeps the max over questions. Max, not sum or
  mean: a token one question needs is kept even when every other question ignores it, whereas averaging
  would dilute a needle that only one of four questions asks for below the tokens all of them glance at.
- `retaining_heads`: Locret-style MLP heads `fc2(act(fc1([q|k|v])))` on the pre-RoPE projections, loaded from a
  safetensors file (keys `layers.{i}.fc1.weight`, `layers.{i}.fc2.weight`, optionally prefixed).
- `random`: uniform scores from a seeded generator (ablations).

`Compressor` is one host's compressor for one prefill: it scores the block's tokens with the chosen scorer,
selects the top l_p per KV head and gathers their K|V, padded to the largest host's count so that one
all-gather moves every host's selection (apb_core.algorithm.passing).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apb_core.algorithm.layout import HostPlan
from apb_core.algorithm.methods import PassingSpec

POOL_WIDTH = 5


def select_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores [Hkv, n] -> indices [Hkv, keep] of the kept tokens per KV head (the largest pooled scores, ties to
    the earlier token), in position order."""
    n = scores.shape[-1]
    keep = min(keep, n)
    pooled = F.max_pool1d(scores.float().unsqueeze(0), POOL_WIDTH, stride=1, padding=POOL_WIDTH // 2).squeeze(0)
    idx = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[:, :keep]
    return idx.sort(dim=-1).values


def query_aware_scores(q_probe: torch.Tensor, k_block: torch.Tensor, scale: float,
                       segments: tuple[int, ...] | list[int] = ()) -> torch.Tensor:
    """q_probe [B, Hq, p, D] (post-RoPE, query-phase positions), k_block [B, Hkv, n, D] -> scores [Hkv, n].

    segments: the probe's questions (lengths summing to p); given more than one, each question's score is the
    mean over its tokens and the result the max over questions (see top). One question: the plain sum.
    """
    hkv = k_block.shape[1]
    b, hq, p, d = q_probe.shape
    qg = q_probe[0].float().view(hkv, hq // hkv, p, d)  # [Hkv, g, p, D]
    logits = torch.einsum("hgpd,hnd->hgpn", qg, k_block[0].float()) * scale
    probs = torch.softmax(logits, dim=-1).sum(dim=1)  # [Hkv, p, n]
    if len(segments) <= 1:
        return probs.sum(dim=1)  # [Hkv, n]
    per_question = [part.mean(dim=1) for part in probs.split(list(segments), dim=1)]  # each [Hkv, n]
    return torch.stack(per_question).amax(dim=0)


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


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: x [B, H, n, D] rotated with cos/sin [B, n, D] -> the pre-RoPE projection (retaining heads read it)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos - rot * sin) / (cos * cos + sin * sin)


@dataclass
class Compressor:
    """Host `plan.rank`'s compressor for one prefill.

    counts: tokens every host sends (from PassingSpec.counts); heads/rope: the retaining heads and the block's
    RoPE cos/sin [B, n, D] (only for the retaining_heads scorer).
    """

    spec: PassingSpec
    plan: HostPlan
    counts: list[int]
    heads: RetainingHeads | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def select(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """This host's kept K|V from the layer's prefill q [B, Hq, S, D], k, v [B, Hkv, S, D]
        -> [B, Hkv, slot, D] each, slot = the largest host's count (zero padded)."""
        plan = self.plan
        a, n = plan.anchor_len, plan.block_len
        k_blk, v_blk = k[:, :, a : a + n], v[:, :, a : a + n]
        if plan.rank == plan.hosts - 1:  # nobody receives the last host's block
            k_sel, v_sel = k_blk[:, :, :0], v_blk[:, :, :0]
        elif self.spec.exact:
            k_sel, v_sel = k_blk, v_blk
        else:
            scores = self.scores(layer, q, k_blk, v_blk, scale)
            idx = select_top(scores, self.counts[plan.rank]).unsqueeze(0).unsqueeze(-1).expand(1, -1, -1, k.shape[-1])
            k_sel, v_sel = k_blk.gather(2, idx), v_blk.gather(2, idx)
        pad = max(self.counts) - k_sel.shape[2]
        if pad:
            k_sel = torch.cat([k_sel, k_sel.new_zeros(*k_sel.shape[:2], pad, k_sel.shape[3])], dim=2)
            v_sel = torch.cat([v_sel, v_sel.new_zeros(*v_sel.shape[:2], pad, v_sel.shape[3])], dim=2)
        return k_sel, v_sel

    def scores(self, layer: int, q: torch.Tensor, k_blk: torch.Tensor, v_blk: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Scores [Hkv, n] of the block's tokens under the spec's scorer."""
        plan = self.plan
        a, n = plan.anchor_len, plan.block_len
        scorer = self.spec.scorer
        if scorer == "random":
            digest = hashlib.sha256(f"{self.spec.seed}/{layer}/{plan.rank}".encode()).digest()
            return random_scores(n, k_blk.shape[1], int.from_bytes(digest[:8], "little"), q.device)
        if scorer == "retaining_heads":
            if self.heads is None or self.rope is None:
                raise RuntimeError("the retaining_heads scorer needs a retaining heads file")
            cos, sin = (t.float() for t in self.rope)
            q_raw = unrotate(q[:, :, a : a + n].float(), cos, sin)
            k_raw = unrotate(k_blk.float(), cos, sin)
            return self.heads.scores(layer, q_raw.to(k_blk.dtype), k_raw.to(k_blk.dtype), v_blk)
        if plan.probe_len == 0:
            raise RuntimeError("the query-aware scorer needs the question probe in the layout")
        return query_aware_scores(q[:, :, a + n :], k_blk, scale, plan.probe_segments)
