"""Worker bodies for the multi-process engine tests (importable by the worker processes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from conftest import tiny_model

from apb_core.algorithm.flops import ModelDims
from apb_core.algorithm.methods import resolve_method
from apb_core.runtime.cache import HostCache
from apb_core.runtime.engine import HostEngine
from apb_core.runtime.generate import AskJob, run_job
from apb_core.runtime.prompt import Prompt


def answer(rank, hosts, kind, context_ids, query_ids, methods, question_ids=(), insert_at=0, probe_ids=()):
    """Run each (method, anchor_len, passing_len[, layout]) on this host; returns [(first_logits, tokens)].
    Layout "balanced" sizes the blocks with the FLOP model of the tiny model (default: equal blocks)."""
    engine = HostEngine(tiny_model(kind), rank, hosts)
    return answer_on(engine, context_ids, query_ids, methods, question_ids, insert_at, probe_ids)


@dataclass
class AnswerJob:
    """`answer_on` as a worker job: runs on the worker's own engine (one host per process, or hosts that take
    turns in one: `--workers`)."""

    args: tuple

    def run(self, host, emit):
        return answer_on(host.engine, *self.args)


def answer_on(engine, context_ids, query_ids, methods, question_ids=(), insert_at=0, probe_ids=()):
    """`answer`'s body on a given engine."""
    hosts = engine.hosts
    prompt = Prompt(list(context_ids), list(query_ids), list(question_ids), list(probe_ids), insert_at)
    out = []
    for name, anchor_len, passing_len, *layout in methods:
        dims = ModelDims.from_config(engine.model.config) if layout == ["balanced"] else None
        method = resolve_method(name, len(context_ids), hosts, anchor_len, passing_len, dims=dims,
                                auto_exact=False, layout=layout[0] if layout else "equal")
        result = run_job(engine, AskJob(prompt, method, max_new_tokens=16), tokenizer=None)
        out.append((result.first_logits, result.token_ids, result.passing_tokens))
    return out


def decode_merge(rank, hosts, seed):
    """Fill each host's cache with its slice of shared random K/V and run one decode attention."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d, n, s = 4, 2, 8, 23, 3
    q = torch.randn(1, hq, s, d, generator=g)
    k_all = torch.randn(1, hkv, n, d, generator=g)
    v_all = torch.randn(1, hkv, n, d, generator=g)
    k_new = torch.randn(1, hkv, s, d, generator=g)
    v_new = torch.randn(1, hkv, s, d, generator=g)
    engine = HostEngine(tiny_model("llama"), rank, hosts)
    bounds = torch.linspace(0, n, hosts + 1).long().tolist()
    lo, hi = bounds[rank], bounds[rank + 1]
    engine.cache = HostCache(1, hkv, d, hi - lo + s, torch.float32, "cpu")
    engine.cache.write(0, 0, k_all[:, :, lo:hi], v_all[:, :, lo:hi])
    engine.cache.length = hi - lo
    call = engine.decode_call()
    out = call.attend(0, q, k_new, v_new, scale=d**-0.5)
    return out, (q, k_all, v_all, k_new, v_new)


def retaining(rank, hosts, heads_path, context_ids, query_ids):
    """APB with Locret-style retaining heads loaded from a safetensors file."""
    engine = HostEngine(tiny_model("llama"), rank, hosts, retaining_heads=heads_path)
    prompt = Prompt(list(context_ids), list(query_ids), [], [], 0)
    method = resolve_method("apb", len(context_ids), hosts, 4, 6, scorer="retaining_heads")
    result = run_job(engine, AskJob(prompt, method, max_new_tokens=4), tokenizer=None)
    return result.first_logits, result.passing_tokens


def shared_answers(rank, hosts, spec, context_ids, queries, decode="eager", questions=(), probes=(), insert_at=0):
    """`queries` answered each over its own prefill, then all over one prefill (run_questions). Returns
    (separate [(first_logits, tokens)], shared [(first_logits, tokens)], the cache length at each shared query
    phase, this host's block length)."""
    from apb_core.runtime.generate import run_questions
    from apb_core.runtime.prompt import shared_prompt

    engine = HostEngine(tiny_model("llama"), rank, hosts, decode=decode)
    name, anchor_len, passing_len = spec
    method = resolve_method(name, len(context_ids), hosts, anchor_len, passing_len, auto_exact=False)
    prompts = [Prompt(list(context_ids), list(q), list(questions[i]) if questions else [],
                      list(probes[i]) if probes else [], insert_at) for i, q in enumerate(queries)]
    separate = [run_job(engine, AskJob(p, method, max_new_tokens=12), tokenizer=None) for p in prompts]
    lengths = []
    step = engine.step

    def recording(ids, start_pos):  # the query phase: more than one token
        if len(ids) > 1:
            lengths.append(engine.cache.length)
        return step(ids, start_pos)

    engine.step = recording
    job = AskJob(shared_prompt(prompts), method, max_new_tokens=12, query_parts=[p.query_ids for p in prompts])
    shared = run_questions(engine, job, tokenizer=None)
    return ([(r.first_logits, r.token_ids) for r in separate], [(r.first_logits, r.token_ids) for r in shared],
            lengths, engine.context_len)


def ask_job(rank, hosts, job, decode="eager"):
    """An AskJob on this host with the tests' tiny llama (runtime.generate.run_questions)."""
    from apb_core.runtime.generate import run_questions

    return run_questions(HostEngine(tiny_model("llama"), rank, hosts, decode=decode), job, None)
