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


def test_retaining_head_selection_is_the_top_k_of_the_heads_scores():
    """Compressor.select with the retaining_heads scorer keeps the tokens with the largest max-pooled head scores,
    computed here from the pre-RoPE q|k|v with the heads' own MLP (fc2(silu(fc1(x))))."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from apb_core.algorithm.compressor import Compressor, RetainingHeads
    from apb_core.algorithm.layout import HostPlan
    from apb_core.algorithm.methods import PassingSpec

    g = torch.Generator().manual_seed(3)
    hq, hkv, d, a, n, keep, hidden = 4, 2, 16, 5, 40, 7, 32
    heads = RetainingHeads([torch.randn(hidden, (hq + 2 * hkv) * d, generator=g)],
                           [torch.randn(hkv, hidden, generator=g)])
    q_raw, k_raw = torch.randn(1, hq, a + n, d, generator=g), torch.randn(1, hkv, a + n, d, generator=g)
    v = torch.randn(1, hkv, a + n, d, generator=g)
    model = tiny_model("llama")
    pos = torch.cat([torch.arange(a), torch.arange(300, 300 + n)])[None]
    cos, sin = model.model.rotary_emb(q_raw, pos)
    q, k = apply_rotary_pos_emb(q_raw, k_raw, cos, sin)
    plan = HostPlan(rank=0, hosts=2, block_start=300, block_end=300 + n, anchor_ids=[0] * a)
    comp = Compressor(PassingSpec(keep, "retaining_heads"), plan, [keep, 0], heads, (cos[:, a:], sin[:, a:]))
    k_sel, v_sel = comp.select(0, q, k, v, d**-0.5)

    feats = torch.cat([t[0, :, a:].transpose(0, 1).reshape(n, -1) for t in (q_raw, k_raw, v)], -1)  # [n, F]
    scores = (torch.nn.functional.silu(feats @ heads.fc1[0].T) @ heads.fc2[0].T).T  # [Hkv, n]
    pooled = torch.stack([scores[:, max(0, i - 2) : i + 3].amax(1) for i in range(n)], 1)
    for h in range(hkv):
        kept = [i for i in range(n) if any(torch.equal(k[0, h, a + i], row) for row in k_sel[0, h])]
        assert len(kept) == keep
        assert torch.allclose(v_sel[0, h], v[0, h, a:][kept])  # K and V of the same tokens, in position order
        top = pooled[h].sort(descending=True).values
        assert torch.allclose(pooled[h, kept].sort(descending=True).values, top[:keep], atol=1e-4)
        assert pooled[h, kept].min() >= top[keep] - 1e-4  # nothing left out scores higher
