"""Retaining heads: RoPE is undone exactly for their inputs, and the scorer runs end to end over 2 hosts."""

import torch
from conftest import run_hosts, tiny_model
from engine_workers import retaining
from safetensors.torch import save_file

from apb_core.algorithm.compressor import unrotate


def test_unrotate_inverts_rope():
    model = tiny_model("llama")
    x = torch.randn(1, 2, 7, 16)
    pos = torch.arange(100, 107)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert (unrotate(rotated, cos, sin) - x).abs().max() <= 1e-5


def test_retaining_heads_scorer_over_two_hosts(tmp_path):
    g = torch.Generator().manual_seed(0)
    features = (4 + 2 * 2) * 16  # (Hq + 2·Hkv) · head_dim of the tiny llama
    tensors = {}
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.fc1.weight"] = torch.randn(32, features, generator=g)
        tensors[f"model.layers.{layer}.self_attn.fc2.weight"] = torch.randn(2, 32, generator=g)
    path = tmp_path / "heads.safetensors"
    save_file(tensors, str(path))
    ctx = torch.randint(3, 256, (40,), generator=g).tolist()
    results = run_hosts(retaining, 2, str(path), ctx, [5, 6, 7])
    (l0, p0), (l1, p1) = results
    assert (p0, p1) == (0, 6)
    assert torch.isfinite(l1).all() and (l0 - l1).abs().max() <= 1e-5
