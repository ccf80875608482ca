"""Decode's log-sum-exp merge across hosts: each host's partial attention over its own cache becomes the
exact attention over every host's keys.

The partials this process computed (one host's, or several when hosts share the process) are merged here in
fp32 first (the merge is associative), then across processes with one all-gather of [out | lse].
"""

from __future__ import annotations

import torch

from apb_core.algorithm.attention import merge_partials
from apb_core.dist.comm import Comm


def merge_hosts(parts: list[tuple[torch.Tensor, torch.Tensor]], comm: Comm | None,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """parts: (out [B, Hq, s, D], lse [B, Hq, s] fp32) per local host; comm: the other processes' hosts (None:
    there are none) -> (out [B, Hq, s, D] in `dtype`, lse [B, Hq, s] fp32) over every host's keys."""
    if len(parts) == 1 and comm is None:
        return parts[0]
    if len(parts) == 1:
        out, lse = parts[0][0].float(), parts[0][1]
    else:
        out, lse = merge_partials([o.float() for o, _ in parts], [x for _, x in parts])
    if comm is not None:
        gathered = comm.all_gather(torch.cat([out, lse.unsqueeze(-1)], dim=-1))  # [processes, B, Hq, s, D+1]
        out, lse = merge_partials([g[..., :-1] for g in gathered], [g[..., -1] for g in gathered])
    return out.to(dtype), lse
