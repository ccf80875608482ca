"""The three methods of one engine, as settings of the same layout + passing machinery.

- full: no anchor, passing = every token of earlier hosts, uncompressed -> exact full attention (any H).
- star: Star Attention; anchor = the whole first block (no question), no passing.
- apb: anchor of l_a tokens with the question inside, query-aware compressed passing of l_p tokens per host.
Exact mode of apb (anchor 0, passing "all") equals full.
"""

from __future__ import annotations

from dataclasses import dataclass

from apb_core.engine import PassingSpec
from apb_core.errors import InputError
from apb_core.layout import default_lengths, split_blocks

METHODS = ("apb", "star", "full")
SCORERS = ("query_aware", "retaining_heads", "random")


@dataclass
class MethodConfig:
    name: str
    anchor_len: int
    passing: PassingSpec
    question_in_anchor: bool

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
) -> MethodConfig:
    """Turn user options into a MethodConfig, filling defaults from the layout table."""
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
    a = default_a if anchor_len is None else anchor_len
    p = default_p if passing_len is None else passing_len
    if a < 0 or (p != "all" and int(p) < 0):
        raise InputError("anchor and passing lengths must be >= 0")
    return MethodConfig("apb", a, PassingSpec(p, scorer, seed), question_in_anchor and a > 0)
