"""Synthetic long-context tasks in the style of RULER and InfiniteBench, sized with the model's tokenizer.

`generate(task, tokenizer, target_tokens, seed, index)` builds one `Sample`: a document (instructions, then a
haystack with needles), a question, the expected answers and the metric that scores them. Everything is
deterministic in (task, seed, index); the tokenizer only decides how much haystack fits (the sizing rule is
in `apb_core.eval.sample`).

This module is the registry; the tasks live by family:
    niah.py           RULER needle-in-a-haystack: niah_single_1..3, niah_multikey_1..3, niah_multivalue,
                      niah_multiquery
    aggregate.py      RULER aggregation: vt (variable tracking), cwe (common words), fwe (frequent words)
    infinitebench.py  InfiniteBench retrieval: passkey, number_string, kv_retrieval
That is RULER's 13 tasks minus the two QA tasks, which need downloaded data, and InfiniteBench's three
synthetic ones.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from apb_core.eval.aggregate import cwe, cwe_counts, fwe, fwe_counts, vt
from apb_core.eval.infinitebench import kv_retrieval, number_string, passkey
from apb_core.eval.niah import NIAH_SPECS, niah_sample
from apb_core.eval.sample import CHAT_TEMPLATE_ALLOWANCE, QUESTION_SEPARATOR, Sample, count_tokens, needle_depth

__all__ = ["CHAT_TEMPLATE_ALLOWANCE", "INFINITEBENCH_TASKS", "QUESTION_SEPARATOR", "RULER_TASKS", "TASKS",
           "Generator", "Sample", "count_tokens", "cwe", "cwe_counts", "fwe", "fwe_counts", "generate",
           "kv_retrieval", "needle_depth", "number_string", "passkey", "vt"]

Generator = Callable[[Any, int, int, int], Sample]  # (tokenizer, target_tokens, seed, index) -> Sample

TASKS: dict[str, Generator] = {
    **{name: partial(niah_sample, spec, name) for name, spec in NIAH_SPECS.items()},
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
    "passkey": passkey,
    "number_string": number_string,
    "kv_retrieval": kv_retrieval,
}
RULER_TASKS: tuple[str, ...] = (*NIAH_SPECS, "vt", "cwe", "fwe")
INFINITEBENCH_TASKS: tuple[str, ...] = ("passkey", "number_string", "kv_retrieval")


def generate(task: str, tokenizer: Any, target_tokens: int, seed: int, index: int) -> Sample:
    """Build sample `index` of `task` for `seed`, sized to at most `target_tokens` prompt tokens.

    Raises ValueError for an unknown task (the message lists the valid ones) or a target too small to hold
    the task's fixed text.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if not isinstance(target_tokens, int) or target_tokens <= 0:
        raise ValueError(f"target_tokens must be a positive integer, got {target_tokens!r}")
    return TASKS[task](tokenizer, target_tokens, seed, index)
