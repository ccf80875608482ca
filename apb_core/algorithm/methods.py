"""The three methods of one engine, as settings of the same layout + passing machinery.

- full: no anchor, passing = every token of earlier hosts, uncompressed -> exact full attention (any H).
- star: Star Attention; anchor = the first block of the equal layout (no question), no passing. (Balancing
  keeps that anchor: host 0 then takes a longer block, which would otherwise shrink the anchor.)
- apb: anchor of l_a tokens with the question inside, query-aware compressed passing of l_p tokens per host.
Exact mode of apb (anchor 0, passing "all") equals full.

Auto-exact (apb's default when neither length is given and the model's shape is known): APB saves attention
work but pays for the anchor, which every host h > 0 runs through QKV and the MLP again. At short contexts
(relative to the model's width) the exact layout, anchor 0 and every earlier token passed uncompressed, costs
the busiest host about as much or less (flops.layout_flops). Exact also all-gathers every earlier block's K/V
each layer: the cost counts those bytes too, priced in FLOPs of the device (flops.FLOPS_PER_BYTE: cheap over
NVLink, dear over gloo on a CPU). When exact costs at most EXACT_SLACK times APB's default layout, apb runs exact:
the same answer as full attention for about the same time. Pass --anchor-len or
--passing-len (or auto_exact=False) to force the approximation. An ablation also forces it: a compressor other
than the default query_aware, or the question left out of the anchor, asks for something the exact layout
does not run, so auto-exact never replaces it (MethodConfig.compressor and .auto_exact record what ran).

Layouts: "balanced" (the default when the model's shape is known) sizes the blocks so that every host's prefill
FLOPs are equal (flops.balanced_lengths): host 0 has no anchor and receives nothing, so it takes a longer block;
"equal" keeps the paper's blocks of equal token counts. The layout never changes what an exact method computes.
"""

from __future__ import annotations

from dataclasses import dataclass

from apb_core.algorithm.flops import FLOPS_PER_BYTE, ModelDims, balanced_lengths, layout_flops, passing_bytes
from apb_core.algorithm.layout import ALL, default_lengths, split_blocks
from apb_core.errors import InputError

METHODS = ("apb", "star", "full")  # what `apb ask` and `apb eval` run; bench adds its baselines
SCORERS = ("query_aware", "retaining_heads", "random")
LAYOUTS = ("balanced", "equal")  # blocks with equal prefill FLOPs per host (FLOP model), or equal token counts
EXACT_SLACK = 1.10  # run exact when it costs the last host at most 10% more FLOPs than APB's default layout


@dataclass(frozen=True)
class PassingSpec:
    """How host blocks are compressed into passing blocks: `keep` tokens per host (ALL = exact, 0 = no passing),
    `scorer` in SCORERS, `seed` for the random scorer."""

    keep: int | str = 0
    scorer: str = "query_aware"
    seed: int = 0

    @property
    def exact(self) -> bool:
        """Every earlier token passed uncompressed: attention over the passing block is full attention."""
        return self.keep == ALL

    @property
    def active(self) -> bool:
        return self.exact or int(self.keep) > 0

    def counts(self, block_lens: list[int]) -> list[int]:
        """Tokens each host sends (per KV head), given every host's block length."""
        if self.exact:
            return list(block_lens)
        return [min(int(self.keep), n) for n in block_lens]


@dataclass
class MethodConfig:
    name: str
    anchor_len: int
    passing: PassingSpec
    question_in_anchor: bool
    block_lens: tuple[int, ...] = ()  # every host's block, in host order
    layout: str = "equal"  # how block_lens were chosen: LAYOUTS
    auto_exact: bool = False  # apb chose the exact layout because it costs about as much (see top)

    @property
    def probe(self) -> bool:
        """Whether hosts append the question probe (only the query-aware compressor reads it)."""
        return self.passing.active and not self.passing.exact and self.passing.scorer == "query_aware"

    @property
    def compressor(self) -> str:
        """The scorer that chose passing tokens in this run: "none" when nothing was compressed (no passing, or
        every earlier token passed exactly), else the PassingSpec's scorer."""
        if not self.passing.active or self.passing.exact:
            return "none"
        return self.passing.scorer

    @property
    def passing_len(self) -> int | str:
        return self.passing.keep

    @property
    def reads_question(self) -> bool:
        """Whether the prefill depends on the question (anchor or probe): if not (full, star, auto-exact, apb
        with a question-free scorer and anchor), one prefill serves any number of questions exactly."""
        return self.question_in_anchor or self.probe


def resolve_method(
    method: str,
    context_len: int,
    hosts: int,
    anchor_len: int | None = None,
    passing_len: int | str | None = None,
    scorer: str = "query_aware",
    question_in_anchor: bool = True,
    seed: int = 0,
    dims: ModelDims | None = None,
    auto_exact: bool = True,
    layout: str = "balanced",
    device: str = "cpu",
) -> MethodConfig:
    """Turn user options into a MethodConfig, filling defaults from the layout table (and, given the model's
    `dims`, balancing the blocks and choosing the exact layout where it costs about as much as APB's: see top).
    Without `dims` the layout is equal (the FLOP model needs the model's shape)."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if scorer not in SCORERS:
        raise InputError(f"unknown compressor {scorer!r}; choose one of {', '.join(SCORERS)}")
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if context_len < hosts:
        raise InputError(f"the context has {context_len} tokens, fewer than the {hosts} hosts asked for")
    if dims is None or hosts == 1:
        layout = "equal"

    def blocks(anchor: int, passing: int | str) -> tuple[int, ...]:
        if layout == "equal":
            return tuple(end - start for start, end in split_blocks(context_len, hosts))
        return tuple(balanced_lengths(dims, context_len, hosts, anchor, passing))

    def cost(lens: tuple[int, ...], anchor: int, passing: int | str) -> float:
        """The busiest host's FLOPs plus the all-gathers, priced in FLOPs of this device (FLOPS_PER_BYTE)."""
        comm = passing_bytes(dims, list(lens), passing) * FLOPS_PER_BYTE.get(device, FLOPS_PER_BYTE["cuda"])
        return max(layout_flops(dims, list(lens), anchor, passing)) + comm

    if method == "full" or hosts == 1 and method != "star":
        passing = ALL if hosts > 1 else 0
        return MethodConfig("full", 0, PassingSpec(passing), False, blocks(0, passing), layout)
    if method == "star":  # the anchor: the first block of the equal layout (Star Attention), unless given
        a = split_blocks(context_len, hosts)[0][1] if anchor_len is None else anchor_len
        return MethodConfig("star", a, PassingSpec(0), False, blocks(a, 0), layout)
    default_a, default_p = default_lengths(context_len, hosts)
    ablation = scorer != SCORERS[0] or not question_in_anchor  # asked for explicitly: never swapped for exact
    if anchor_len is None and passing_len is None and dims is not None and auto_exact and not ablation:
        exact_lens, apb_lens = blocks(0, ALL), blocks(default_a, default_p)
        if cost(exact_lens, 0, ALL) <= EXACT_SLACK * cost(apb_lens, default_a, default_p):
            return MethodConfig("apb", 0, PassingSpec(ALL), False, exact_lens, layout, auto_exact=True)
    a = default_a if anchor_len is None else anchor_len
    p = default_p if passing_len is None else passing_len
    if a < 0 or (p != ALL and int(p) < 0):
        raise InputError("anchor and passing lengths must be >= 0")
    return MethodConfig("apb", a, PassingSpec(p, scorer, seed), question_in_anchor and a > 0, blocks(a, p), layout)
