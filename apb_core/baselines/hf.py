"""The plain-transformers reference for CPU speed claims: what a user gets without apb.

`AutoModelForCausalLM` + `generate` (greedy, full attention, sdpa, fp32) in one process on the same prompt
(apb's chat-templated prompt), timed the way a user would feel it: loading (from the GGUF, as transformers
does it, or from a converted folder), time to first token (prefill) and the rest of generate (decode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from apb_core.runtime.timing import sync


@dataclass
class HfRun:
    answer: str
    load_s: float
    prefill_s: float
    decode_s: float
    generated_tokens: int
    prompt_tokens: int


class _TokenClock:
    """A generate() streamer that notes when each new token arrives (the first one ends prefill)."""

    def __init__(self) -> None:
        self.calls = 0
        self.token_at: list[float] = []

    def put(self, value) -> None:
        self.calls += 1
        if self.calls >= 2:  # call 1 is the prompt
            self.token_at.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def first_token_at(self) -> float | None:
        return self.token_at[0] if self.token_at else None


def timed_generate(model, prompt_ids: list[int], new_tokens: int, pad_token_id: int | None = None):
    """Greedy `generate` as a user calls it: (logits of the first new token [vocab], new tokens, seconds to the
    first token, seconds per later token)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    clock = _TokenClock()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(new_tokens, 1),
                             min_new_tokens=max(new_tokens, 1), do_sample=False, streamer=clock,
                             pad_token_id=pad_token_id, output_logits=True, return_dict_in_generate=True)
    sync(device)
    stamps = [t0, *clock.token_at]
    per_token = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    return out.logits[0][0].float().cpu(), out.sequences[0, len(prompt_ids):].tolist(), stamps[1] - t0, per_token


def hf_generate(source, prompt_ids: list[int], max_new_tokens: int, from_gguf: bool, threads: int) -> HfRun:
    """Load with transformers (GGUF de-quantisation when `from_gguf`) and generate greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apb_core import models

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if from_gguf and source.kind in ("gguf", "embedded"):
        folder, name = str(source.path.parent), source.path.name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(models.prepared_dir(source), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(models.prepared_dir(source))
    model.eval()
    load_s = time.perf_counter() - t0
    clock = _TokenClock()
    ids = torch.tensor([prompt_ids])
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, streamer=clock, pad_token_id=tokenizer.eos_token_id)
    t2 = time.perf_counter()
    new = out[0, len(prompt_ids):].tolist()
    first = clock.first_token_at or t2
    return HfRun(
        answer=tokenizer.decode(new, skip_special_tokens=True).strip(), load_s=load_s, prefill_s=first - t1,
        decode_s=t2 - first, generated_tokens=len(new), prompt_tokens=len(prompt_ids),
    )
