"""How a worker's failure reaches the user: one line naming the host, the cause, and for out-of-memory errors
what would fit."""

from __future__ import annotations

import math
import re

import torch

from apb_core.dist.env import Env

OOM_EXIT_CODE = 77  # a worker that ran out of memory exits with this (its one-line report may not get out); 3 is the fault injection's


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is the device (or allocator) running out of memory: CUDA's OutOfMemoryError, Python's
    MemoryError, or the CPU allocator's "can't allocate memory" (a memory limit such as ulimit -v)."""
    text = str(exc).lower()
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "can't allocate memory" in text or "cannot allocate memory" in text)


_GIB = {"B": 2**-30, "KiB": 2**-20, "MiB": 2**-10, "GiB": 1.0, "TiB": 2**10}


def _gib(pattern: str, text: str) -> float | None:
    m = re.search(pattern + r" ([\d.]+) (B|KiB|MiB|GiB|TiB)", text)
    return float(m.group(1)) * _GIB[m.group(2)] if m else None


# Activation values per token of one layer's prefill, in units of (hidden + intermediate): calibrated on an H200
# (random 1.1B llama, bf16, 2 hosts, ~12 GiB left free by another process): the largest document that fit had
# 186K-215K tokens; with the ~9.5 GiB of room that run had this predicts ~189K, while the linear estimate from
# the failed allocation alone said 331K after a 373K-token failure.
ACTIVATION_FACTOR = 5.0


def describe_oom(exc: BaseException, rank: int, hosts: int, engine, context: int | None) -> str:
    """One line for an out-of-memory error on host `rank`: what it was doing, and roughly what would fit.

    Sizes come from the CUDA allocator's message (else from the device). Two estimates of the context that
    would fit, the smaller one is reported:
    - linear: what is ours beyond weights and the CUDA context grows with the context, and needed at least
      in use + requested: fit = context * room / (in use + requested - weights - overhead). An upper bound:
      the allocation that failed is rarely the last one the prefill needs;
    - per token: this host's tokens cost the KV cache plus ACTIVATION_FACTOR * (hidden + intermediate) values.
    room = min(capacity, in use + free) - weights - overhead (memory of this process that torch does not hold).
    """
    device = engine.device if engine is not None else None
    where = f"host {rank} of {hosts}" + (f" ({device})" if device is not None else "")
    if context is None or engine is None:
        return (f"out of memory on {where} while loading the model: its weights do not fit; use a smaller "
                "model or a device with more memory")
    line = f"out of memory on {where} with a {context}-token context"
    text = str(exc)
    capacity, requested = _gib("total capacity of", text), _gib("Tried to allocate", text)
    in_use = _gib("this process has", text) or _gib("Of the allocated memory", text)
    if device is not None and device.type == "cuda":
        capacity = capacity or torch.cuda.get_device_properties(device).total_memory / 2**30
        in_use = in_use or torch.cuda.max_memory_allocated(device) / 2**30
    free = _gib("of which", text)
    if capacity and in_use and free is not None:  # other processes on the GPU: only what is ours or free counts
        capacity = min(capacity, in_use + free)
    allocated, cached = _gib("Of the allocated memory", text), _gib("is allocated by PyTorch, and", text)
    overhead = max(0.0, in_use - allocated - cached) if in_use and allocated and cached is not None else 0.0
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 2**30
    room = (capacity or 0.0) - weights - overhead
    if room > 0 and in_use and requested is not None and in_use + requested - weights - overhead > 0:
        ratio = min(1.0, room / (in_use + requested - weights - overhead))
        cfg = engine.model.config
        held = -(-context // hosts)  # this host's block (its anchor and probe are small beside it)
        per_token = engine.dtype.itemsize * (
            2 * engine.layers * engine.kv_heads * engine.head_dim
            + ACTIVATION_FACTOR * (cfg.hidden_size + getattr(cfg, "intermediate_size", 4 * cfg.hidden_size))
        ) / 2**30
        ratio = min(ratio, room / (max(held, 1) * per_token))
        line += (f"; about {int(context * ratio)} context tokens would fit on {hosts} host(s), or this document on "
                 f"about {math.ceil(hosts / ratio)} hosts")
    return line + "; use more hosts, --truncate, or a shorter document"


def describe(exc: BaseException, env: Env) -> str:
    """One line for a worker's failure (followed by the whole traceback with APB_DEBUG)."""
    first = (str(exc).splitlines() or [""])[0]
    if isinstance(exc, RuntimeError) and "timed out" in first.lower():  # gloo/NCCL collective timeout
        line = (f"timed out after {env.collective_timeout_s:g} s waiting for another worker in a collective "
                "(it is stuck or died; APB_COLLECTIVE_TIMEOUT sets the limit)")
    else:
        line = f"{type(exc).__name__}: {first[:300]}"
    if env.debug:
        import traceback

        return line + "\n" + "".join(traceback.format_exception(exc))
    return line
