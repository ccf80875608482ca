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
share of the softmax, so masses of all hosts add up to the true attention of the whole sequence.

When: a decode step only *records* its query row and merged lse per cited layer (two small copies into fixed
[rows] buffers at a device-side row counter: static shapes, capturable in the CUDA decode graph); the q·Kᵀ over
the block, its exp and the sums run once after the answer (`fold`), as a few batched matmuls over all the rows.
Computed inside every step instead, they cost +4.5 % decode time on one host and +14.6 % on two in-process
hosts (one H200, graph decode, 32K, docs/quality.md); recorded and folded, +1.4..+2.4 % and +2.2..+2.9 %, fold
included. One all-gather after the answer brings the hosts' blocks together.
"""

from __future__ import annotations

import torch

CITE_LAYER_FRACTION = 0.25  # the upper quarter of the layers


def cite_layers(layers: int, fraction: float = CITE_LAYER_FRACTION) -> tuple[int, ...]:
    """The layers whose attention counts: the last max(1, round(fraction * layers)) (1.0: all layers)."""
    n = min(layers, max(1, round(fraction * layers)))
    return tuple(range(layers - n, layers))


class AttentionMass:
    """One host's attention mass per block token: `mass` [block_len] fp32, on the engine's device, complete
    after `fold`. Holds up to `rows` recorded query rows per cited layer between resets (the query phase's last
    row plus one per decode step: max_new_tokens rows)."""

    # fp32 logits per fold chunk. CPU: 16 MiB stays near the caches (scripts/cite_mass_micro.py). GPU: 16 MiB
    # meant 32 chunks of a few small kernels per layer, 32 ms per 128-token answer at 32K on one H200; 256 MiB
    # is one or two chunks per layer at 32K and a transient buffer the size of a few layers' KV at 128K.
    FOLD_BYTES = 16 << 20
    FOLD_BYTES_ACCELERATOR = 256 << 20

    def __init__(self, block_len: int, layers: tuple[int, ...], device, rows: int) -> None:
        self.block_len = block_len
        self.layers = tuple(sorted(set(layers)))
        self.slot = {layer: i for i, layer in enumerate(self.layers)}
        self.rows = max(1, rows)
        self.mass = torch.zeros(block_len, dtype=torch.float32, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)  # rows recorded since the last reset
        self.q_log: torch.Tensor | None = None  # [layers, rows, B, Hq, D] in the query's dtype (on first record)
        self.lse_log: torch.Tensor | None = None  # [layers, rows, B, Hq] fp32
        self.scale = 1.0
        self._row: torch.Tensor | None = None  # this step's write index [1]

    def reset(self) -> None:
        """Zero the mass and the row counter in place (a captured decode graph keeps using the same tensors)."""
        self.mass.zero_()
        self.step.zero_()

    def checkpoint(self) -> torch.Tensor:
        """The row counter's value (to undo warm-up steps run before a graph capture: `restore`)."""
        return self.step.clone()

    def restore(self, step: torch.Tensor) -> None:
        self.step.copy_(step)

    def add(self, layer: int, q: torch.Tensor, lse: torch.Tensor, scale: float) -> None:
        """Record the last query row of `layer` and its merged lse (the attention itself waits for `fold`, which
        reads the block's keys from the cache). q [B, Hq, s, D] post-RoPE; lse [B, Hq, s] fp32, merged over
        every host."""
        slot = self.slot.get(layer)
        if slot is None or self.block_len == 0:
            return
        b, hq, _, d = q.shape
        if self.q_log is None:
            self.q_log = torch.zeros(len(self.layers), self.rows, b, hq, d, dtype=q.dtype, device=q.device)
            self.lse_log = torch.zeros(len(self.layers), self.rows, b, hq, dtype=torch.float32, device=q.device)
        self.scale = scale
        if slot == 0:  # one write index per step; past `rows` it stays on the last row and fold refuses
            self._row = torch.clamp(self.step, max=self.rows - 1).view(1)
        self.q_log[slot].index_copy_(0, self._row, q[:, :, -1].unsqueeze(0))
        self.lse_log[slot].index_copy_(0, self._row, lse[:, :, -1].float().unsqueeze(0))
        if slot == len(self.layers) - 1:
            self.step += 1

    def fold(self, k_block_of) -> None:
        """Add the recorded rows' attention probabilities over the block keys, summed over rows, heads and
        layers, to `mass`, and empty the record. k_block_of(layer) -> [B, Hkv, block_len, D] (the cache)."""
        n = int(self.step)
        if n > self.rows:
            raise RuntimeError(f"--cite recorded {n} query rows but had room for {self.rows}")
        if n == 0 or self.q_log is None:
            return
        for slot, layer in enumerate(self.layers):
            k_block = k_block_of(layer)
            b, hkv, length, d = k_block.shape
            hq = self.q_log.shape[3]
            group = hq // hkv
            budget = self.FOLD_BYTES if k_block.device.type == "cpu" else self.FOLD_BYTES_ACCELERATOR
            chunk = max(1, budget // max(1, b * hq * length * 4))
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                # [r, B, Hq, D] -> [B, Hkv, r*G, D]: query head i reads KV head i // G
                q = self.q_log[slot, start:stop].to(k_block.dtype)
                q = q.view(stop - start, b, hkv, group, d).permute(1, 2, 0, 3, 4).reshape(b, hkv, -1, d)
                lse = self.lse_log[slot, start:stop].view(stop - start, b, hkv, group).permute(1, 2, 0, 3)
                logits = torch.matmul(q, k_block.transpose(-1, -2)).float()  # [B, Hkv, r*G, L]
                probs = logits.mul_(self.scale).sub_(lse.reshape(b, hkv, -1, 1)).exp_()  # in place: one buffer
                self.mass += probs.sum(dim=(0, 1, 2))
        self.step.zero_()

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
