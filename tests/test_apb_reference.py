"""Compressed APB against a reference written from the paper, not from the engine: its own layer loop, RoPE,
masks, positions, query-aware scorer, max-pool and top-k (only the model's weights and norms are shared).

Per layer, every host h runs [anchor (h > 0, question inside, positions 0..) | block (global positions) | probe
(h < H-1, the question at its query-phase positions)]; hosts < H-1 score their block's keys with the probe's
softmax attention (summed over the probe tokens and the GQA group), max-pool them (width 5), keep the top l_p per
KV head; host h attends over [kept of hosts < h | anchor | block | probe] under the APB mask. The query then
attends exactly to every host's block KV. fp32; the engine must match within 1e-4.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import reference, run_hosts, tiny_model, tokens
from engine_workers import answer

CTX_LEN, QUERY_LEN, ANCHOR, PASSING, INSERT_AT = 61, 6, 8, 4, 2
TOL = 1e-4


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x [H, S, D] rotated at positions pos [S] (rotate-half convention of Llama)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _top_pooled(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores [Hkv, n] -> sorted indices [Hkv, keep] of the largest width-5 max-pooled scores; ties go to the
    earlier token (the pool makes 5-token plateaus, so the rule matters; the engine documents the same one)."""
    n = scores.shape[1]
    pooled = torch.stack([scores[:, max(0, i - 2) : i + 3].amax(1) for i in range(n)], 1)
    rows = []
    for h in range(scores.shape[0]):
        order = sorted(range(n), key=lambda i, h=h: (-pooled[h, i].item(), i))
        rows.append(sorted(order[:keep]))
    return torch.tensor(rows)



class _Host:
    """One host's sequence: token ids, positions, and where anchor / block / probe sit in it."""

    def __init__(self, ids, pos, a, n, p):
        self.ids, self.pos, self.a, self.n, self.p = ids, pos, a, n, p


def _apb_reference(model, ctx, query, question, probe, hosts, anchor_len, passing_len):
    """First logits after `query` under compressed APB (see the module docstring)."""
    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta
    group, scale, n_ctx = hq // hkv, d**-0.5, len(ctx)
    anchor = (ctx[:INSERT_AT] + question + ctx[INSERT_AT:])[: max(anchor_len, INSERT_AT + len(question))]
    sizes = [n_ctx // hosts + (1 if h < n_ctx % hosts else 0) for h in range(hosts)]
    starts = [sum(sizes[:h]) for h in range(hosts)]
    plan = []
    for h in range(hosts):
        a = anchor if h > 0 else []
        pr = probe if h < hosts - 1 else []
        pos = list(range(len(a))) + list(range(starts[h], starts[h] + sizes[h])) + list(range(n_ctx, n_ctx + len(pr)))
        plan.append(_Host(a + ctx[starts[h] : starts[h] + sizes[h]] + pr, torch.tensor(pos), len(a), sizes[h], len(pr)))
    states = [model.model.embed_tokens(torch.tensor(host.ids)) for host in plan]  # [S, hidden]
    caches = []  # per layer: [(k_block, v_block)] per host
    for layer in model.model.layers:
        att = layer.self_attn
        qkv = []
        for host, x in zip(plan, states, strict=True):
            y = layer.input_layernorm(x)
            q = _rope(att.q_proj(y).view(-1, hq, d).transpose(0, 1), host.pos, theta)
            k = _rope(att.k_proj(y).view(-1, hkv, d).transpose(0, 1), host.pos, theta)
            v = att.v_proj(y).view(-1, hkv, d).transpose(0, 1)
            qkv.append((q, k, v))
        kept = []
        for h, (host, (q, k, v)) in enumerate(zip(plan, qkv, strict=True)):
            if h == hosts - 1:
                kept.append(None)
                continue
            blk = slice(host.a, host.a + host.n)
            q_probe = q[:, host.a + host.n :].reshape(hkv, group, host.p, d)
            probs = torch.softmax(torch.einsum("hgpd,hnd->hgpn", q_probe, k[:, blk]) * scale, -1)
            idx = _top_pooled(probs.sum((1, 2)), min(passing_len, host.n))
            kept.append((torch.stack([k[i, blk][idx[i]] for i in range(hkv)]),
                         torch.stack([v[i, blk][idx[i]] for i in range(hkv)])))
        layer_cache = []
        for h, (host, (q, k, v)) in enumerate(zip(plan, qkv, strict=True)):
            pk = torch.cat([kept[j][0] for j in range(h)], 1) if h else k[:, :0]
            pv = torch.cat([kept[j][1] for j in range(h)], 1) if h else v[:, :0]
            keys, values = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
            s, npass = q.shape[1], pk.shape[1]
            mask = torch.zeros(s, npass + s, dtype=torch.bool)  # the APB mask, written out
            mask[: host.a, npass : npass + host.a] = torch.ones(host.a, host.a, dtype=torch.bool).tril()
            mask[host.a :, : npass + host.a] = True
            local = s - host.a
            mask[host.a :, npass + host.a :] = torch.ones(local, local, dtype=torch.bool).tril()
            kk, vv = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
            logits = (q @ kk.transpose(1, 2)) * scale
            out = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ vv  # [Hq, S, D]
            x = states[h] + att.o_proj(out.transpose(0, 1).reshape(s, hq * d))
            states[h] = x + layer.mlp(layer.post_attention_layernorm(x))
            blk = slice(host.a, host.a + host.n)
            layer_cache.append((k[:, blk], v[:, blk]))
        caches.append(layer_cache)
    # query phase: exact attention over every host's block KV (the whole context, in order) and itself
    pos = torch.arange(n_ctx, n_ctx + len(query))
    x = model.model.embed_tokens(torch.tensor(query))
    for layer, layer_cache in zip(model.model.layers, caches, strict=True):
        att = layer.self_attn
        y = layer.input_layernorm(x)
        q = _rope(att.q_proj(y).view(-1, hq, d).transpose(0, 1), pos, theta)
        k = _rope(att.k_proj(y).view(-1, hkv, d).transpose(0, 1), pos, theta)
        v = att.v_proj(y).view(-1, hkv, d).transpose(0, 1)
        keys = torch.cat([c[0] for c in layer_cache] + [k], 1).repeat_interleave(group, 0)
        values = torch.cat([c[1] for c in layer_cache] + [v], 1).repeat_interleave(group, 0)
        mask = torch.ones(len(query), n_ctx + len(query), dtype=torch.bool)
        mask[:, n_ctx:] = torch.ones(len(query), len(query), dtype=torch.bool).tril()
        logits = (q @ keys.transpose(1, 2)) * scale
        out = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ values
        x = x + att.o_proj(out.transpose(0, 1).reshape(len(query), hq * d))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))[-1]


@pytest.mark.parametrize("hosts", [2, 3])
def test_compressed_apb_equals_independent_reference(hosts):
    ctx, query, question = tokens(40 + hosts, CTX_LEN), tokens(50 + hosts, QUERY_LEN), tokens(60 + hosts, 3)
    probe = query[:3]
    model = tiny_model("llama")
    with torch.no_grad():
        ref = _apb_reference(model, ctx, query, question, probe, hosts, ANCHOR, PASSING)
        full, _ = reference(model, ctx, query, new_tokens=1)
    assert (ref - full).abs().max().item() > 1e-3  # the compression is real: the reference is not full attention
    results = run_hosts(answer, hosts, "llama", ctx, query, [("apb", ANCHOR, PASSING)], question, INSERT_AT, probe)
    for rank in range(hosts):
        logits, _, passing = results[rank][0]
        assert passing == PASSING * rank  # host h receives l_p tokens from each earlier host
        assert (logits - ref).abs().max().item() <= TOL, rank


def test_pooled_top_k_helper_breaks_ties_by_position():
    scores = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    assert _top_pooled(scores, 3).tolist() == [[0, 1, 2]]  # pooled: 5 at 0..4, then 1 at 6..8
    assert F.max_pool1d(scores[None], 5, 1, 2)[0].tolist() == [[5.0, 5.0, 5.0, 5.0, 5.0, 0.0, 1.0, 1.0, 1.0]]
