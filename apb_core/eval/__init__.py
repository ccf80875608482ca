"""Offline quality suite: RULER- and InfiniteBench-style synthetic tasks and their scorers.

    sample = generate("niah_single_2", tokenizer, target_tokens=32768, seed=0, index=3)
    answer = ...  # the engine answers sample.question about sample.document (optionally after answer_prefix)
    points = score(sample, answer)  # in [0, 1]

`TASKS` maps each task name to its generator; `RULER_TASKS` and `INFINITEBENCH_TASKS` group them.
"""

from apb_core.eval.scoring import METRICS, score
from apb_core.eval.tasks import INFINITEBENCH_TASKS, RULER_TASKS, TASKS, Sample, generate

__all__ = ["INFINITEBENCH_TASKS", "METRICS", "RULER_TASKS", "TASKS", "Sample", "generate", "score"]
