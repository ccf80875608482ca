"""Helpers for multi-process tests: tiny random models and gloo workers on this machine."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
from datetime import timedelta

import torch

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=4096),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, vocab_size=256, max_position_embeddings=4096, sliding_window=None),
}


def tiny_model(kind: str = "llama", seed: int = 0, attn: str = "sdpa"):
    """A tiny random model of a real family; weights depend only on `seed` (logits made peaky for argmax)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, **TINY[kind])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0) if not cfg.tie_word_embeddings else None
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, hosts, port, args, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    if hosts > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=hosts,
                                timeout=timedelta(seconds=60))
    try:
        out.put((rank, pickle.dumps(fn(rank, hosts, *args))))  # by value: no shared-memory handles
    except BaseException as exc:  # surface the failure in the test
        out.put((rank, exc))
    finally:
        if hosts > 1:
            dist.destroy_process_group()


def run_hosts(fn, hosts: int, *args, timeout: float = 120.0) -> list:
    """Run fn(rank, hosts, *args) in `hosts` gloo processes; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, hosts, port, args, out)) for r in range(hosts)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(hosts):
            rank, value = out.get(timeout=timeout)
            if isinstance(value, BaseException):
                raise value
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.exitcode is None:
                p.kill()
    return [results[r] for r in range(hosts)]
