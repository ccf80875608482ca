"""What several test modules share: tiny random models of the product's presets, token streams, the dense
one-process reference, a runner for functions on H hosts (the product's own workers), a tiny saved model with
the embedded model's tokenizer, and a scan for the processes of a run.

Worker modules import the helpers here as `from conftest import tiny_model` (pytest puts tests/ on the path).
torch and transformers are imported inside the helpers: test modules that need neither stay quick to collect.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The test's name for a model family -> the product preset of that family (apb_core.models.PRESETS).
PRESET_OF = {"llama": "tiny", "qwen2": "tiny-qwen", "qwen3": "tiny-qwen3", "mistral": "tiny-mistral"}
LM_HEAD_SCALE = 20.0  # peaky logits: the greedy token cannot flip on float rounding between two exact paths


def tiny_model(kind: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides: Any):
    """The tiny preset of family `kind` with random weights that depend only on `seed`, fp32 on CPU, its
    lm_head scaled by LM_HEAD_SCALE. `overrides` set config fields the preset does not have (e.g. one KV
    head) before the weights are made."""
    import torch

    from apb_core import models

    if overrides:
        from transformers import AutoModelForCausalLM

        config = models.build_config(PRESET_OF[kind])
        for name, value in overrides.items():
            setattr(config, name, value)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn).eval()
    else:
        model = models.build_random_model(PRESET_OF[kind], "cpu", torch.float32, attn_implementation=attn, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return model


def tokens(seed: int, n: int) -> list[int]:
    """n token ids in [3, 256) (no special ids of the tiny presets), the same for the same seed."""
    import torch

    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model, ctx: list[int], query: list[int], new_tokens: int = 16):
    """Plain transformers, one process, full recompute per token: (logits after ctx+query [vocab], the
    `new_tokens` greedy tokens)."""
    import torch

    ids, generated, first = ctx + query, [], None
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            first = logits if first is None else first
            generated.append(int(logits.argmax()))
            ids = ids + [generated[-1]]
    return first, generated


@dataclass
class Call:
    """A job for the product's workers (apb_core.dist.worker): fn(rank, hosts, *args) on every host. `fn` is a
    module-level function (pickled by name); it builds its own models and uses the group the worker joined."""

    fn: Callable
    args: tuple = ()

    def run(self, host, emit):
        return self.fn(host.engine.rank, host.engine.hosts, *self.args)


def run_hosts(fn: Callable, hosts: int, *args) -> list:
    """fn(rank, hosts, *args) in `hosts` gloo worker processes started by the product's launcher; returns the
    results in rank order. A worker that raises ends the run with WorkerError (one line). forkserver: this
    process has run torch compute on several threads, after which a forked worker can hang in its first kernel
    (apb_core.dist.launcher.default_start_method)."""
    from apb_core.dist.launcher import Workers
    from apb_core.dist.worker import WorkerSpec

    with Workers(WorkerSpec(preset="tiny", device="cpu", threads=1), hosts, start_method="forkserver") as workers:
        return workers.run(Call(fn, args))


# -- a tiny model on disk, for runs of the real CLI ------------------------------------------------------------------
def save_tiny_model(folder: Path, tokenizer, pickle: bool = False) -> None:
    """The "tiny" preset (llama) with `tokenizer`'s vocabulary and special tokens and random weights, saved with
    the tokenizer in `folder` (as safetensors, or as the pickle checkpoint older models ship with pickle=True)."""
    import torch
    from transformers import AutoModelForCausalLM

    from apb_core import models

    config = models.build_config("tiny")
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if pickle:
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded model's tokenizer (APB_TEST_TOKENIZER=DIR takes it from DIR where that is not installed)."""
    from apb_core.errors import ApbError
    from apb_core.models import load_tokenizer, resolve_model

    if os.environ.get("APB_TEST_TOKENIZER"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.environ["APB_TEST_TOKENIZER"])
    try:
        return load_tokenizer(resolve_model(None))
    except ApbError as exc:
        pytest.skip(f"needs the embedded model's tokenizer: {exc}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    """A directory `apb ask --model` loads in well under a second: `save_tiny_model` with the embedded tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(folder, embedded_tokenizer)
    return folder


def tagged(tag: str) -> list[int]:
    """Pids of live processes whose environment holds APB_TEST_RUN=tag (zombies have no environment): every
    process of a run started with that tag, whatever its parent or session became. Linux only (/proc)."""
    needle = f"APB_TEST_RUN={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids
