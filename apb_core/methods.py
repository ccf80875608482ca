"""The three methods of one engine, as settings of the same layout + passing machinery.

- full: no anchor, passing = every token of earlier hosts, uncompressed -> exact full attention (any H).
- star: Star Attention; anchor = the whole first block (no question), no passing.
- apb: anchor of l_a tokens with the question inside, query-aware compressed passing of l_p tokens per host.
Exact mode of apb (anchor 0, passing "all") equals full.

Auto-exact (apb's default when neither length is given and the model's shape is known): APB saves attention
work but pays for the anchor, which every host h > 0 runs through QKV and the MLP again. At short contexts
(relative to the model's width) the exact layout, anchor 0 and every earlier token passed uncompressed, costs
the last host about as much or less (flops.last_host_flops; e.g. SmolLM2-135M at 4K tokens over 2 hosts:
exact 1.03x APB's FLOPs; Llama-3.1-8B at 32K over 2: 1.06x). When exact costs at most EXACT_SLACK times
APB's default layout, apb runs exact: the same answer as full attention for about the same time. Pass
--anchor-len or --passing-len (or auto_exact=False) to force the approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

from apb_core.engine import PassingSpec
from apb_core.errors import InputError
from apb_core.flops import ModelDims, last_host_flops
from apb_core.layout import default_lengths, split_blocks

METHODS = ("apb", "star", "full")
SCORERS = ("query_aware", "retaining_heads", "random")
EXACT_SLACK = 1.10  # run exact when it costs the last host at most 10% more FLOPs than APB's default layout


@dataclass
class MethodConfig:
    name: str
    anchor_len: int
    passing: PassingSpec
    question_in_anchor: bool
    auto_exact: bool = False  # apb chose the exact layout because it costs about as much (see top)

    @property
    def probe(self) -> bool:
        """Whether hosts append the question probe (only the query-aware compressor reads it)."""
        return self.passing.active and self.passing.keep != "all" and self.passing.scorer == "query_aware"

    @property
    def passing_len(self) -> int | str:
        return self.passing.keep


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
) -> MethodConfig:
    """Turn user options into a MethodConfig, filling defaults from the layout table (and, given the model's
    `dims`, choosing the exact layout where it costs about as much as APB's: see top)."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if scorer not in SCORERS:
        raise InputError(f"unknown compressor {scorer!r}; choose one of {', '.join(SCORERS)}")
    if context_len < hosts:
        raise InputError(f"the context has {context_len} tokens, fewer than the {hosts} hosts asked for")
    if method == "full" or hosts == 1 and method != "star":
        return MethodConfig("full", 0, PassingSpec("all" if hosts > 1 else 0), False)
    if method == "star":
        first_block = split_blocks(context_len, hosts)[0]
        a = first_block[1] if anchor_len is None else anchor_len
        return MethodConfig("star", a, PassingSpec(0), False)
    default_a, default_p = default_lengths(context_len, hosts)
    if anchor_len is None and passing_len is None and dims is not None and auto_exact:
        exact = last_host_flops(dims, context_len, hosts, 0, "all")
        if exact <= EXACT_SLACK * last_host_flops(dims, context_len, hosts, default_a, default_p):
            return MethodConfig("apb", 0, PassingSpec("all"), False, auto_exact=True)
    a = default_a if anchor_len is None else anchor_len
    p = default_p if passing_len is None else passing_len
    if a < 0 or (p != "all" and int(p) < 0):
        raise InputError("anchor and passing lengths must be >= 0")
    return MethodConfig("apb", a, PassingSpec(p, scorer, seed), question_in_anchor and a > 0)
