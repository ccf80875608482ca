"""Layout: how one prompt is cut over H hosts, what each host prefills, and at which positions.

The prompt is `context` (chat-template head + document) followed by the `query part` (question + template
tail). The context is cut into H contiguous blocks whose lengths differ by at most one token (no padding, so
no pad token can reach the output). Host h prefills

    [anchor (l_a, hosts h > 0) | its block (true global positions) | probe (question at its true positions)]

- The anchor is the start of the context with the question inserted where the user turn begins (`insert_at`,
  after the chat-template head, never inside a system prompt), cut to l_a tokens; positions 0..l_a-1.
- The probe (only when the query-aware compressor needs it) is the question placed after the block at the
  positions it will have in the query phase. Causal attention means it changes nothing of the block's KV; its
  query vectors score the block's keys. This gives host 0, which has no anchor, a query-aware score too.
Anchor and probe KV are dropped after prefill: every host keeps exactly the KV of its block.
Several questions over one prefill (APB's shared prefill): the anchor holds all of them, one after the other,
and the probe is each question's probe in turn, every one at its own query-phase positions (they all start
right after the context); the compressor scores the block with each question and keeps the max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are built: option checks read this module's constants fast
    import torch

# Default lengths (paper, section 9: l_a = l_b/4 up to 8K tokens, l_p = l_b/8), where l_b = ceil(n / H).
# Short blocks get at least min(l_b/2, 512) passing tokens: small models at a few thousand tokens lost the
# needle with l_p = l_b/8 (SmolLM2, 3K-token sample, H = 2: l_p 193 wrong, 730 right) and passing tokens only
# add keys to attention (no QKV/FFN work), so this is the cheapest place to buy quality back.
#
# | context n, H       | l_b    | anchor l_a          | passing l_p       |
# |--------------------|--------|---------------------|-------------------|
# | 3.4K, 2 (CPU)      | 1.7K   | 425                 | 512 (floor)       |
# | 8K, 4              | 2K     | 512                 | 512 (floor)       |
# | 32K, 8             | 4K     | 1K                  | 512         |
# | 128K, 8            | 16K    | 4K                  | 2K          |
# | 128K, 2            | 64K    | 8K (cap)            | 8K          |
# | 512K, 8            | 64K    | 8K (cap = l_b/8)    | 8K          |
ALL = "all"  # a passing length: every token of every earlier block, uncompressed (the exact layout)
ANCHOR_FRACTION = 4
PASSING_FRACTION = 8
ANCHOR_CAP = 8192
MIN_ANCHOR = 64
PASSING_FLOOR = 512


def default_lengths(context_len: int, hosts: int) -> tuple[int, int]:
    """(anchor_len, passing_len) for a context of `context_len` tokens over `hosts` hosts (table above)."""
    if hosts <= 1:
        return 0, 0
    block = math.ceil(context_len / hosts)
    anchor = min(max(block // ANCHOR_FRACTION, min(MIN_ANCHOR, block)), ANCHOR_CAP)
    passing = max(block // PASSING_FRACTION, min(block // 2, PASSING_FLOOR), 1)
    return anchor, passing


def split_blocks(context_len: int, hosts: int) -> list[tuple[int, int]]:
    """H contiguous [start, end) blocks covering the context; the first `context_len % H` get one more token."""
    base, extra = divmod(context_len, hosts)
    return bounds_of([base + (1 if h < extra else 0) for h in range(hosts)])


def bounds_of(block_lens: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """Contiguous [start, end) blocks of the given lengths, in host order."""
    bounds, start = [], 0
    for n in block_lens:
        bounds.append((start, start + n))
        start += n
    return bounds


@dataclass(frozen=True)
class HostPlan:
    """What host `rank` prefills. Token lists are python ints so a plan pickles cheaply to a worker."""

    rank: int
    hosts: int
    block_start: int
    block_end: int
    anchor_ids: list[int] = field(default_factory=list)
    probe_ids: list[int] = field(default_factory=list)
    probe_start: int = 0  # global position of the first probe token
    # several questions over one prefill: the probe is their probes in turn, each at the query-phase positions
    # probe_start.. it will have when that question is asked (empty: one question)
    probe_lens: tuple[int, ...] = ()

    @property
    def anchor_len(self) -> int:
        return len(self.anchor_ids)

    @property
    def block_len(self) -> int:
        return self.block_end - self.block_start

    @property
    def probe_len(self) -> int:
        return len(self.probe_ids)

    @property
    def kept(self) -> slice:
        """Where the block sits in the prefill sequence: only its KV is cached (anchor and probe are dropped)."""
        return slice(self.anchor_len, self.anchor_len + self.block_len)

    def input_ids(self, context_ids: list[int]) -> torch.Tensor:
        """[1, l_a + block + probe] token ids."""
        import torch

        ids = self.anchor_ids + context_ids[self.block_start : self.block_end] + self.probe_ids
        return torch.tensor([ids], dtype=torch.long)

    @property
    def probe_segments(self) -> tuple[int, ...]:
        """Lengths of the probe's questions, in order (one segment for one question, none without a probe)."""
        if not self.probe_len:
            return ()
        return self.probe_lens or (self.probe_len,)

    def position_ids(self) -> torch.Tensor:
        """[1, S]: anchor 0..l_a-1, block at its global positions, each question's probe at its query-phase
        positions."""
        import torch

        probes = [torch.arange(self.probe_start, self.probe_start + n) for n in self.probe_segments]
        return torch.cat(
            [torch.arange(self.anchor_len), torch.arange(self.block_start, self.block_end), *probes]
        ).unsqueeze(0)


def build_anchor(
    context_ids: list[int], anchor_len: int, question_ids: list[int], insert_at: int
) -> list[int]:
    """The first tokens of the context with the question inserted at `insert_at`, `anchor_len` tokens long.

    The anchor is never shorter than head + question (it must hold the whole question), and never longer than
    the context allows.
    """
    if anchor_len <= 0:
        return []
    if not question_ids:
        return context_ids[:anchor_len]
    insert_at = min(insert_at, len(context_ids))
    length = max(anchor_len, insert_at + len(question_ids))
    doc_tail = context_ids[insert_at : insert_at + length - insert_at - len(question_ids)]
    return context_ids[:insert_at] + question_ids + doc_tail


def plan_hosts(
    context_ids: list[int],
    hosts: int,
    anchor_len: int,
    question_ids: list[int],
    insert_at: int,
    question_in_anchor: bool,
    probe_ids: list[int],
    probe_start: int,
    block_lens: list[int] | tuple[int, ...] | None = None,
    probe_lens: list[int] | tuple[int, ...] = (),
) -> list[HostPlan]:
    """One HostPlan per host. `probe_ids` (may be empty) follow each block for the query-aware compressor
    (not on the last host, whose passing block nobody receives). `block_lens`: the layout's block lengths
    (default: equal blocks). `probe_lens`: with several questions, each one's share of `probe_ids`."""
    if probe_lens and sum(probe_lens) != len(probe_ids):
        raise ValueError(f"probe lengths {list(probe_lens)} do not add up to the probe's {len(probe_ids)} tokens")
    anchor = build_anchor(context_ids, anchor_len, question_ids if question_in_anchor else [], insert_at)
    bounds = bounds_of(block_lens) if block_lens is not None else split_blocks(len(context_ids), hosts)
    if len(bounds) != hosts or bounds[-1][1] != len(context_ids):
        raise ValueError(f"block lengths {block_lens} do not cut {len(context_ids)} tokens over {hosts} hosts")
    plans = []
    for rank, (start, end) in enumerate(bounds):
        with_probe = bool(probe_ids) and rank < hosts - 1
        plans.append(
            HostPlan(
                rank=rank,
                hosts=hosts,
                block_start=start,
                block_end=end,
                anchor_ids=anchor if rank > 0 else [],
                probe_ids=list(probe_ids) if with_probe else [],
                probe_start=probe_start,
                probe_lens=tuple(probe_lens) if with_probe else (),
            )
        )
    return plans
