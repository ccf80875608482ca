"""RULER's needle-in-a-haystack family: magic numbers or UUIDs hidden under keys in a long haystack.

All eight variants are one generator, `niah_sample`, driven by a `NiahSpec` (which haystack, what the keys
and values look like, how many keys, values per key and asked keys); `NIAH_SPECS` names them as RULER does:
    niah_single_1    noise haystack, word key -> 7-digit number
    niah_single_2    essay haystack, word key -> number
    niah_single_3    essay haystack, word key -> UUID
    niah_multikey_1  essay haystack, 4 keys (1 asked, 3 distractors) -> numbers
    niah_multikey_2  haystack made of distractor needles, word keys -> numbers
    niah_multikey_3  haystack made of distractor needles, UUID keys -> UUIDs
    niah_multivalue  essay haystack, one key with 4 values, all expected
    niah_multiquery  essay haystack, 4 keys asked at once
The "essay" haystack is real prose (`haystack.text_haystack`: the Python documentation, never repeated within a
sample), or the generated essays where that is shorter than the target; `Sample.haystack` says which ran.
Needle depths are uniform at random per sample (`needle_depth`), as RULER draws them.
max_new_tokens is RULER's 128 for the multi-value and multi-query variants, 64 for the one-answer ones (the
answer plus a restated question fits in ~45 tokens even for a UUID, and on CPU every decode step counts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from apb_core.eval import haystack
from apb_core.eval.sample import Distinct, Question, Sample, needle_depth, random_uuid, sized_sample, task_rng


@dataclass(frozen=True)
class NiahSpec:
    """One needle-in-a-haystack variant."""

    haystack: str  # "noise" | "essay" | "needles" (the haystack is distractor needles)
    key: str  # "word" | "uuid"
    value: str  # "number" | "uuid"
    keys: int = 1  # distinct keys with needles in the document; the first `queries` are asked
    values: int = 1  # values per key
    queries: int = 1
    max_new_tokens: int = 64


NIAH_SPECS: dict[str, NiahSpec] = {
    "niah_single_1": NiahSpec("noise", "word", "number"),
    "niah_single_2": NiahSpec("essay", "word", "number"),
    "niah_single_3": NiahSpec("essay", "word", "uuid"),
    "niah_multikey_1": NiahSpec("essay", "word", "number", keys=4),
    "niah_multikey_2": NiahSpec("needles", "word", "number"),
    "niah_multikey_3": NiahSpec("needles", "uuid", "uuid"),
    "niah_multivalue": NiahSpec("essay", "word", "number", values=4, max_new_tokens=128),
    "niah_multiquery": NiahSpec("essay", "word", "number", keys=4, queries=4, max_new_tokens=128),
}


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(haystack.KEY_ADJECTIVES)}-{rng.choice(haystack.KEY_NOUNS)}"


def _number7(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind}s for {key} is: {value}."


def niah_sample(spec: NiahSpec, task: str, tokenizer: Any, target_tokens: int, seed: int, index: int) -> Sample:
    """Sample `index` of the variant `spec` (registered as `task`), sized to at most `target_tokens`.

    The first asked needle sits at `needle_depth(index)`, the other needles at random depths; every value of
    every asked key is expected in the answer (metric string_match_all).
    """
    rng = task_rng(task, seed, index)
    draw_key = _word_key if spec.key == "word" else random_uuid
    draw_value = _number7 if spec.value == "number" else random_uuid
    kind = "number" if spec.value == "number" else "uuid"
    keys = Distinct(rng, draw_key).take(spec.keys)
    values = Distinct(rng, draw_value).take(spec.keys * spec.values)
    pairs = [(key, values[i * spec.values + j]) for i, key in enumerate(keys) for j in range(spec.values)]
    asked = keys[:spec.queries]
    answers = [value for key, value in pairs if key in asked]
    depth = needle_depth(task, seed, index)
    needles = [(depth if i == 0 else rng.random(), _needle(kind, key, value)) for i, (key, value) in enumerate(pairs)]

    if spec.haystack == "needles":
        fill_keys = Distinct(task_rng(task, seed, index, "fill-keys"), draw_key, exclude=keys)
        fill_values = Distinct(task_rng(task, seed, index, "fill-values"), draw_value, exclude=values)

        def distractor(j: int) -> str:
            fill_keys.take(j + 1)
            fill_values.take(j + 1)
            return _needle(kind, fill_keys.items[j], fill_values.items[j]) + "\n"

        hay, hay_name = haystack.Haystack(unit=distractor, can_insert=lambda j: True, needle_sep="\n"), "needles"
    elif spec.haystack == "essay":
        hay, hay_name = haystack.text_haystack(rng, tokenizer, target_tokens)
    else:
        hay, hay_name = haystack.noise_haystack(), "noise"

    intro = (f"Some special magic {kind}s are hidden in the text below. Read it carefully and remember them; "
             f"you will be asked about them afterwards.")

    def one_key(key: str) -> tuple[str, str]:
        return (f"What is the special magic {kind} for {key} mentioned in the provided text?",
                f"The special magic {kind} for {key} mentioned in the provided text is")

    if len(answers) == 1:
        question, prefix = one_key(asked[0])
    else:
        names = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
        question = f"What are all the special magic {kind}s for {names} mentioned in the provided text?"
        prefix = f"The special magic {kind}s for {names} mentioned in the provided text are"
    sample = sized_sample(task, tokenizer, target_tokens, seed, index,
                          render=lambda n: intro + "\n\n" + hay.render(n, needles), question=question,
                          answers=answers, metric="string_match_all", max_new_tokens=spec.max_new_tokens,
                          answer_prefix=prefix, depth=depth, haystack=hay_name)
    if spec.keys > 1 and spec.values == 1:  # every key's needle is in the document: each key is a question
        for key, value in pairs:
            key_question, key_prefix = one_key(key)
            sample.questions.append(Question(key_question, [value], key_prefix))
    return sample
