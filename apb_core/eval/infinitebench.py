"""InfiniteBench's three synthetic retrieval tasks, regenerated locally at any length.

    passkey        Retrieve.PassKey: 5-digit key in repeated noise
    number_string  Retrieve.Number: 10-digit string with repeated digits in repeated noise (InfiniteBench's
                   construction: 5 random digits, then 5 times a random digit doubled in place)
    kv_retrieval   Retrieve.KV: JSON object of UUID -> UUID, one key asked
Needle depths are uniform at random per sample (`needle_depth`). Each scores with its own metric of the same
name (see `apb_core.eval.scoring`); max_new_tokens 16 / 24 / 64.
"""

from __future__ import annotations

import json
from typing import Any

from apb_core.eval import haystack
from apb_core.eval.sample import Distinct, Sample, needle_depth, random_uuid, sized_sample, task_rng

_IB_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
             "memorize it; you will be asked about it afterwards.")


def _noise_retrieval(task: str, tokenizer: Any, target_tokens: int, seed: int, index: int, *, secret: str,
                     needle: str, question: str, prefix: str, max_new_tokens: int) -> Sample:
    depth = needle_depth(task, seed, index)
    hay = haystack.noise_haystack()
    return sized_sample(task, tokenizer, target_tokens, seed, index,
                        render=lambda n: _IB_INTRO + "\n\n" + hay.render(n, [(depth, needle)]), question=question,
                        answers=[secret], metric=task, max_new_tokens=max_new_tokens, answer_prefix=prefix,
                        depth=depth, haystack="noise")


def passkey(tokenizer: Any, target_tokens: int, seed: int, index: int) -> Sample:
    """A 5-digit pass key hidden in repeated noise sentences; the first number of the answer must be it."""
    key = str(task_rng("passkey", seed, index).randrange(10_000, 100_000))
    return _noise_retrieval("passkey", tokenizer, target_tokens, seed, index, secret=key,
                            needle=f"The pass key is {key}. Keep it in mind: {key} is the pass key.",
                            question="What is the pass key?", prefix="The pass key is", max_new_tokens=16)


def repeated_digits(rng) -> str:
    """InfiniteBench's number_string key (data/construct_synthetic_dataset.py): 5 random digits, then 5 times a
    digit at a random place is doubled in place, so the 10 digits hold runs like "7733" that a model must copy
    exactly. A leading zero is possible, as there (the scorer compares integers)."""
    digits = [str(rng.randint(0, 9)) for _ in range(5)]
    for k in range(5):
        pos = rng.randint(0, 5 + k - 1)
        digits.insert(pos, digits[pos])
    return "".join(digits)


def number_string(tokenizer: Any, target_tokens: int, seed: int, index: int) -> Sample:
    """A 10-digit string with repeated digits hidden in repeated noise; the first number of the answer must be it."""
    number = repeated_digits(task_rng("number_string", seed, index))
    return _noise_retrieval("number_string", tokenizer, target_tokens, seed, index, secret=number,
                            needle=f"The sequence of digits is {number}. Remember it. {number} is the sequence "
                                   f"of digits.",
                            question="What is the sequence of digits?", prefix="The sequence of digits is",
                            max_new_tokens=24)


def kv_retrieval(tokenizer: Any, target_tokens: int, seed: int, index: int) -> Sample:
    """A JSON object of UUID keys to UUID values; the asked pair sits at `needle_depth(index)` of the object."""
    task = "kv_retrieval"
    rng = task_rng(task, seed, index)
    key, value = random_uuid(rng), random_uuid(rng)
    fill_keys = Distinct(task_rng(task, seed, index, "fill-keys"), random_uuid, exclude=[key])
    fill_values = Distinct(task_rng(task, seed, index, "fill-values"), random_uuid, exclude=[value])
    depth = needle_depth(task, seed, index)

    def render(n: int) -> str:
        pairs = list(zip(fill_keys.take(n), fill_values.take(n), strict=True))
        pairs.insert(round(depth * n), (key, value))
        return ("Extract the value that belongs to the requested key from the JSON object below.\n\n"
                "JSON data:\n" + json.dumps(dict(pairs)))

    return sized_sample(task, tokenizer, target_tokens, seed, index, render=render,
                        question=f'Key: "{key}"\nWhat is the value associated with this key in the JSON object '
                                 f'above?',
                        answers=[value], metric="kv_retrieval", max_new_tokens=64,
                        answer_prefix="The value associated with the specified key is:", depth=depth,
                        haystack="json")
