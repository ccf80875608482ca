"""`apb eval` as a library: run the synthetic tasks through `Session.answer` for several methods and host
counts, score every answer, and summarise accuracy per (length, task, method, hosts) with the gap to `full`.

    config = EvalConfig(tasks=["niah_single_1", "vt"], lengths=[4096], samples=3, methods=["full", "apb"],
                        hosts=[2, 4])
    summary = run_eval(config, out_path="results.jsonl")

Why it is shaped this way:
- One `Session` per hosts value: the model is loaded once per worker and reused for every sample and method
  (methods and ablations switch through `Session.answer` settings), because on a CPU a model load costs as
  much as a short prefill.
- `full` is exact at any H (passing carries every earlier token uncompressed; the engine tests prove it equals
  one-process attention), so it is computed once per sample at the first hosts value and its result is reused
  for the other hosts rows. Those rows say so (`reused_from_hosts`), and their timings are the first run's.
- Every sample's `answer_prefix` ends the prompt, so the model continues it, and the score is computed on the
  continuation alone, as RULER does (the prefix never contains an answer).
- Ablation overrides (`compressor`, `question_in_anchor`, `anchor_len`, `passing_len`) apply to `apb` only:
  `star` keeps its definition (anchor = the whole first block, no passing) and `full` stays exact, so both
  remain the fixed references an ablation is compared against.
- Rows are appended to the JSONL file and flushed as they are produced: a long CPU run that is stopped keeps
  every finished sample.
- `split_questions` (`apb eval --split-questions`): documents that hold several keys (SPLIT_TASKS) are asked
  one question per key, all about the one document, and each answer is scored on its own key. Every method
  answers them with one prefill each; `apb` answers them a second time over one shared prefill (every question
  in the anchor and the probe), in rows labelled `apb+shared`: the measure of what sharing the prefill costs.
  Exact layouts need no such row: shared and separate prefills give them the same tokens (tests/test_engine.py).
- `reuse_prefill` (`apb eval --split-questions --reuse-prefill`): what the server's `"apb": {"reuse": true}`
  does, measured before it is offered: each key's question is also answered over the prefill made for the next
  key's question alone (its anchor and query-aware compression chose tokens for that other question), in rows
  labelled `apb+reuse` (`prefill_question`: the key the prefill read). The same prefill answers its own question
  first (the `apb` row), so the mode costs one more query phase and decode per question, and no prefill.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any

from apb_core.algorithm.methods import METHODS
from apb_core.api import AskRequest, AskResult
from apb_core.errors import InputError
from apb_core.eval import stats
from apb_core.eval.niah import NIAH_SPECS
from apb_core.eval.scoring import cite_hit, score
from apb_core.eval.tasks import INFINITEBENCH_TASKS, RULER_TASKS, TASKS, Sample, generate

DEFAULT_METHODS = ("full", "star", "apb")  # full first: its answers are the reference of the others
ABLATION_KEYS = ("compressor", "question_in_anchor", "anchor_len", "passing_len", "auto_exact", "layout")
SPLIT_TASKS = tuple(name for name, spec in NIAH_SPECS.items() if spec.keys > 1 and spec.values == 1)
NEEDLE_TASKS = (*NIAH_SPECS, *INFINITEBENCH_TASKS)  # one passage holds the answer: cite_hit applies
SHARED = "+shared"  # the label suffix of answers given over one shared prefill (split_questions)
REUSE = "+reuse"  # ... and of answers given over a prefill made for another question (reuse_prefill)
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(TASKS),
    "ruler": RULER_TASKS,
    "infinitebench": INFINITEBENCH_TASKS,
}


@dataclass
class EvalConfig:
    """What one `apb eval` run covers.

    lengths: target prompt sizes in tokens (each sample is generated to at most this many).
    max_new_tokens: a cap on each task's own answer budget (None: the task's budget, RULER's values).
    ablation: `Session.answer` settings for `apb` only (keys in ABLATION_KEYS); empty = the engine defaults.
    """

    tasks: list[str]
    lengths: list[int]
    samples: int = 3
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    hosts: list[int] = field(default_factory=lambda: [2])
    model: str | None = None
    seed: int = 0
    device: str = "cpu"
    max_new_tokens: int | None = None
    threads: int | None = None
    ablation: dict[str, Any] = field(default_factory=dict)
    split_questions: bool = False  # one question per key of SPLIT_TASKS' documents, apb also over one prefill
    reuse_prefill: bool = False  # split_questions: apb also answers each key over the prefill of another key
    retaining_heads: str | None = None  # heads file the workers load (ablation compressor retaining_heads)
    cite: bool = False  # every answer cites its sources; needle tasks' rows get cite_hit (scoring.cite_hit)
    workers: list[int] | None = None  # worker processes for each hosts value (None: one per host)

    def check(self) -> None:
        """Raise InputError naming the first bad field (the CLI validates first; this guards library use)."""
        if not self.tasks:
            raise InputError("no task selected")
        for task in self.tasks:
            if task not in TASKS:
                raise InputError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise InputError(f"lengths must be positive token counts (got {self.lengths})")
        if self.samples < 1:
            raise InputError(f"samples must be at least 1 (got {self.samples})")
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise InputError(f"methods must be among {', '.join(METHODS)} (got {self.methods})")
        if not self.hosts or any(h < 1 for h in self.hosts):
            raise InputError(f"hosts must be at least 1 (got {self.hosts})")
        if self.workers is not None and (len(self.workers) != len(self.hosts) or any(
                w < 1 or h % w for h, w in zip(self.hosts, self.workers, strict=True))):
            raise InputError(f"workers {self.workers} must divide hosts {self.hosts}, one value each")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.split_questions and any(t not in SPLIT_TASKS for t in self.tasks):
            raise InputError(f"--split-questions needs tasks whose documents hold several keys: "
                             f"{', '.join(SPLIT_TASKS)}")
        if self.reuse_prefill and not (self.split_questions and "apb" in self.methods):
            raise InputError("--reuse-prefill needs --split-questions and the apb method (it answers one key's "
                             "question over the prefill made for another key of the same document)")
        if self.ablation.get("compressor") == "retaining_heads" and not self.retaining_heads:
            raise InputError("the retaining_heads compressor needs a retaining heads file (retaining_heads)")
        unknown = set(self.ablation) - set(ABLATION_KEYS)
        if unknown:
            raise InputError(f"unknown ablation setting(s) {sorted(unknown)}; use {', '.join(ABLATION_KEYS)}")


@dataclass
class Cell:
    """Accuracy of one (length, task, method, hosts) over its samples, in points (mean score x 100)."""

    length: int
    task: str
    method: str
    hosts: int
    samples: int
    accuracy: float
    delta_vs_full: float | None  # accuracy - full's accuracy on the same samples; None without full
    reused_full: bool = False  # full's numbers come from the first hosts value (full is exact at any H)
    cite_hit: float | None = None  # --cite: % of the correct answers whose top citation holds the needle
    # 95% bootstrap intervals (eval.stats), [lo, hi] in points; None in summaries made before they existed
    accuracy_ci: list[float] | None = None  # resampling the samples (averages: within each task)
    delta_ci: list[float] | None = None  # paired with full's rows of the same samples; None without full
    paired: int | None = None  # answers paired with full's (delta_ci's basis; = samples when full ran them all)
    target: str | None = None  # averages of non-full methods: met | unresolved | missed (stats.target_verdict)


@dataclass
class EvalSummary:
    """Per-task cells, per-(length, method, hosts) averages over tasks, and notes the output must carry."""

    config: dict[str, Any]
    cells: list[Cell]
    averages: list[Cell]  # task == "average": the unweighted mean of the task accuracies
    notes: list[str]
    rows: int
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "cells": [asdict(c) for c in self.cells],
            "averages": [asdict(c) for c in self.averages],
            "notes": self.notes,
            "rows": self.rows,
            "wall_s": self.wall_s,
        }


def prompt_digest(sample: Sample) -> str:
    """First 16 hex digits of sha256(document + "\\n\\n" + question), i.e. of the user turn the model reads:
    two rows with the same digest were asked the same thing, whatever run or machine produced them."""
    return hashlib.sha256(sample.user_message.encode("utf-8")).hexdigest()[:16]


def _row(sample: Sample, result: AskResult, method: str, hosts: int, points: float, length: int,
         reused_from: int | None, ablation: dict[str, Any]) -> dict[str, Any]:
    """One JSONL record: what was asked, what came back, how it scored, and how long it took."""
    return {
        "task": sample.task,
        "index": sample.index,
        "seed": sample.seed,
        "length": length,
        "sample_tokens": sample.actual_tokens,
        "prompt_tokens": result.prompt_tokens,
        "depth": sample.depth,
        "method": method,
        "hosts": hosts,
        "workers": result.workers,  # processes that ran the hosts (fewer: in-process hosts, the same math)
        "reused_from_hosts": reused_from,
        "anchor_len": result.anchor_len,
        "passing_len": result.passing_len,
        "auto_exact": result.auto_exact,
        "compressor": result.compressor,  # what ran ("none": nothing compressed), whatever the ablation asked
        "question_in_anchor": result.question_in_anchor,
        "haystack": sample.haystack,
        "ablation": ablation if method == "apb" else {},
        "digest": prompt_digest(sample),
        "metric": sample.metric,
        "expected": sample.answers,
        "answer_prefix": sample.answer_prefix,
        "answer": result.answer,
        "score": points,
        "correct": points >= 1.0,
        "generated_tokens": result.generated_tokens,
        **_cite_fields(sample, result),
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "model": result.model,
        "device": result.device,
    }


def _cite_fields(sample: Sample, result: AskResult) -> dict[str, Any]:
    """--cite: the top citation and, for needle tasks, cite_hit (scoring.cite_hit); nothing without citations."""
    if result.citations is None:
        return {}
    top = asdict(result.citations[0]) if result.citations else None
    return {"citation": top} | ({"cite_hit": cite_hit(result.citations, sample.answers)}
                                if sample.task in NEEDLE_TASKS else {})


def _new_tokens(config: EvalConfig, sample: Sample) -> int:
    return sample.max_new_tokens if config.max_new_tokens is None else min(sample.max_new_tokens,
                                                                           config.max_new_tokens)


def run_eval(
    config: EvalConfig,
    out_path: str | os.PathLike[str] | None = None,
    on_row: Callable[[dict[str, Any], int, int], None] | None = None,
) -> EvalSummary:
    """Generate, answer and score every (length, task, sample) for every method and hosts value.

    out_path: JSONL file, truncated, then one row per (sample, method, hosts) appended as it is scored.
    on_row(row, done, total): progress callback (the CLI prints a line per row).
    Raises InputError before any worker starts when a sample's prompt does not fit the model window.
    """
    from apb_core.ask import Session
    from apb_core.runtime.prompt import build_prompt

    config.check()
    t_start = time.perf_counter()
    computed_methods = [m for m in config.methods if m != "full"]
    runs_per_sample = len(computed_methods) * len(config.hosts) + (1 if "full" in config.methods else 0)
    total = len(config.lengths) * len(config.tasks) * config.samples * len(config.hosts) * len(config.methods)
    if config.split_questions:  # SPLIT_TASKS ask 4 keys; apb answers twice (three times with reuse_prefill)
        apb_extra = ("apb" in config.methods) * (1 + config.reuse_prefill)
        total = total // len(config.methods) * 4 * (len(config.methods) + apb_extra)
    done = 0
    asked = 0  # Session.answer's question index (it only labels events and adds set-up time to index 0)
    samples: dict[tuple[int, str, int], Sample] = {}
    full_rows: dict[tuple[int, str, int], dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    sink: IO[str] | None = open(out_path, "w", encoding="utf-8") if out_path is not None else None
    try:
        for h_index, hosts in enumerate(config.hosts):
            workers = config.workers[h_index] if config.workers else None
            request = AskRequest(document="", questions=[], model=config.model, hosts=hosts, device=config.device,
                                 seed=config.seed, threads=config.threads, retaining_heads=config.retaining_heads,
                                 workers=workers)
            # forkserver once this process has run torch compute (citations): a forked worker can hang after it
            # (apb_core.dist.launcher.default_start_method); the first host count's workers fork
            session = Session(request, start_method="forkserver" if h_index else None)
            if not samples:
                for length in config.lengths:
                    for task in config.tasks:
                        for index in range(config.samples):
                            sample = _generate(task, session.tokenizer, length, config.seed, index)
                            # fail before any worker starts if the prompt plus the answer budget overflows
                            build_prompt(session.tokenizer, sample.document, sample.question, session.window,
                                         _new_tokens(config, sample), "none", sample.answer_prefix)
                            samples[(length, task, index)] = sample
            methods = config.methods if h_index == 0 else computed_methods
            with session:
                for (length, task, index), sample in samples.items():
                    for method in methods:
                        settings = replace(request, method=method, max_new_tokens=_new_tokens(config, sample),
                                           cite=config.cite, **(config.ablation if method == "apb" else {}))
                        if config.split_questions:
                            scored = _ask_split(session, sample, settings, method, hosts, length, asked, config)
                            asked += len(scored)  # Session.answer's question index (labels only)
                        else:
                            result = session.answer(sample.document, sample.question, asked,
                                                    answer_prefix=sample.answer_prefix, settings=settings)
                            asked += 1
                            points = score(sample, result.answer)
                            scored = [_row(sample, result, method, hosts, points, length, None, config.ablation)]
                        new = []
                        for row in scored:
                            new.append(row)
                            if method == "full":
                                full_rows[(length, task, index)] = row
                                new += [dict(row, hosts=h, reused_from_hosts=hosts) for h in config.hosts[1:]]
                        for r in new:
                            rows.append(r)
                            if sink is not None:
                                sink.write(json.dumps(r, ensure_ascii=False) + "\n")
                                sink.flush()
                            done += 1
                            if on_row is not None:
                                on_row(r, done, total)
    finally:
        if sink is not None:
            sink.close()
    cells, averages = summarise(rows)
    notes = []
    if "full" in config.methods and len(config.hosts) > 1:
        notes.append(f"full is exact at any number of hosts: it ran once per sample at H={config.hosts[0]} and "
                     f"its result is reused for H={', '.join(map(str, config.hosts[1:]))}")
    notes.append(f"{config.samples} sample(s) per task and length: one sample moves a task's accuracy by "
                 f"{100 / config.samples:.0f} points")
    notes.append(f"intervals are 95% bootstrap intervals ({stats.ROUNDS} rounds): delta paired with full on the "
                 f"same samples, averages resampled within each task; target: the average delta's interval "
                 f"vs full - {stats.TARGET_POINTS:g} point (met: all above, missed: all below, else unresolved)")
    if config.ablation:
        settings = ", ".join(f"{k}={v}" for k, v in config.ablation.items())
        notes.append(f"ablation settings apply to apb only: {settings}")
    return EvalSummary(
        config=asdict(config) | {"runs_per_sample": runs_per_sample},
        cells=cells, averages=averages, notes=notes, rows=len(rows), wall_s=time.perf_counter() - t_start,
    )


def _ask_split(session, sample: Sample, settings: AskRequest, method: str, hosts: int, length: int, asked: int,
               config: EvalConfig) -> list[dict[str, Any]]:
    """Rows of `sample`'s per-key questions under `method`: one prefill each, and for apb also all over one
    shared prefill (labelled method + SHARED) and, with reuse_prefill, each over another key's prefill (REUSE)."""
    questions = sample.questions
    texts, prefixes = [q.question for q in questions], [q.answer_prefix for q in questions]
    separate = replace(settings, shared_prefill=False)
    rows = []
    if method == "apb" and config.reuse_prefill:
        rows += _ask_reusing(session, sample, separate, hosts, length, asked, config)
    else:
        results = session.answer_all(sample.document, texts, asked, prefixes, settings=separate)
        rows += [_split_row(sample, j, result, method, hosts, length, config) for j, result in enumerate(results)]
    if method == "apb":
        results = session.answer_all(sample.document, texts, asked + len(rows), prefixes,
                                     settings=replace(settings, shared_prefill=True))
        rows += [_split_row(sample, j, result, method + SHARED, hosts, length, config)
                 for j, result in enumerate(results)]
    return rows


def _ask_reusing(session, sample: Sample, settings: AskRequest, hosts: int, length: int, asked: int,
                 config: EvalConfig) -> list[dict[str, Any]]:
    """apb's rows for every key j over the prefill made for key j's question alone, and the next key's rows over
    that same prefill (REUSE): every question is answered once over its own prefill and once over another's."""
    questions = sample.questions
    rows = []
    for j, question in enumerate(questions):
        other = (j + 1) % len(questions)
        own, reused = session.answer_all(
            sample.document, [question.question, questions[other].question], asked + 2 * j,
            [question.answer_prefix, questions[other].answer_prefix], settings=settings, prefill_for=0)
        rows.append(_split_row(sample, j, own, "apb", hosts, length, config, prefill_question=j))
        rows.append(_split_row(sample, other, reused, "apb" + REUSE, hosts, length, config, prefill_question=j))
    return rows


def _split_row(sample: Sample, j: int, result: AskResult, label: str, hosts: int, length: int, config: EvalConfig,
               **extra: Any) -> dict[str, Any]:
    """The row of key j's question of `sample` answered as `result`, scored on that key's answers."""
    question = sample.questions[j]
    keyed = replace(sample, answers=question.answers)
    row = _row(keyed, result, label, hosts, score(keyed, result.answer), length, None, config.ablation)
    row.update(question=j, asked=question.question, expected=question.answers,
               answer_prefix=question.answer_prefix, shared_prefill=result.shared_prefill,
               ablation=config.ablation if label.startswith("apb") else {}, **extra)
    return row


def _generate(task: str, tokenizer: Any, length: int, seed: int, index: int) -> Sample:
    try:
        return generate(task, tokenizer, length, seed, index)
    except ValueError as exc:  # a target too small for the task's fixed text is the user's input
        raise InputError(str(exc)) from None


def summarise(rows: Iterable[dict[str, Any]], *, rounds: int = stats.ROUNDS,
              seed: int = 0) -> tuple[list[Cell], list[Cell]]:
    """Cells per (length, task, method, hosts) and their unweighted averages over tasks, both with the gap to
    `full` (same length, task and hosts). Rows are JSONL records, so a saved file can be re-summarised.

    Every cell also carries 95% bootstrap intervals (`rounds` resamples, seeded by `seed` and the cell's
    key, eval.stats): accuracy_ci, and delta_ci over the differences to full on the same samples; averages
    resample within each task and say whether the issue's target (>= full - 1 point) holds (`target`)."""
    scores: dict[tuple[int, str, str, int], list[float]] = defaultdict(list)
    by_key: dict[tuple[int, str, str, int], list[dict[str, Any]]] = defaultdict(list)
    reused: dict[tuple[int, str, str, int], bool] = {}
    hits: dict[tuple[int, str, str, int], list[float]] = defaultdict(list)  # cite_hit of the correct answers
    for row in rows:
        key = (row["length"], row["task"], row["method"], row["hosts"])
        scores[key].append(float(row["score"]))
        by_key[key].append(row)
        reused[key] = row.get("reused_from_hosts") is not None
        if row.get("cite_hit") is not None and row["correct"]:
            hits[key].append(float(row["cite_hit"]))
    acc_units = {key: stats.score_units(group) for key, group in by_key.items()}
    pair_units = {key: stats.paired_units(group, by_key[(key[0], key[1], "full", key[3])])
                  for key, group in by_key.items() if (key[0], key[1], "full", key[3]) in by_key}
    cells = []
    for key, values in scores.items():
        length, task, method, hosts = key
        full = scores.get((length, task, "full", hosts))
        accuracy = 100 * sum(values) / len(values)
        delta = None if full is None else accuracy - 100 * sum(full) / len(full)
        cite = 100 * sum(hits[key]) / len(hits[key]) if hits.get(key) else None
        cells.append(Cell(length, task, method, hosts, len(values), accuracy, delta, reused[key], cite,
                          **_intervals([key], task, acc_units, pair_units, rounds, seed)))
    groups: dict[tuple[int, str, int], list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[(cell.length, cell.method, cell.hosts)].append(cell)
    averages = []
    for (length, method, hosts), group in groups.items():
        deltas = [c.delta_vs_full for c in group]
        keys = [(length, c.task, method, hosts) for c in group]
        intervals = _intervals(keys, "average", acc_units, pair_units, rounds, seed)
        averages.append(Cell(
            length, "average", method, hosts, sum(c.samples for c in group),
            sum(c.accuracy for c in group) / len(group),
            None if any(d is None for d in deltas) else math.fsum(deltas) / len(deltas),  # type: ignore[arg-type]
            all(c.reused_full for c in group),
            **intervals,
            target=None if method == "full" else stats.target_verdict(intervals["delta_ci"]),
        ))
    return cells, averages


def _intervals(keys: list[tuple[int, str, str, int]], task: str, acc_units: dict[Any, list[stats.Unit]],
               pair_units: dict[Any, list[stats.Unit]], rounds: int, seed: int) -> dict[str, Any]:
    """accuracy_ci, delta_ci and paired of one cell (one key) or of an average over tasks (`task` "average",
    one key per task, each task a stratum). The seed names the cell, so its interval does not depend on
    which other cells exist."""
    length, _, method, hosts = keys[0]
    name = f"{seed}|{length}|{task}|{method}|{hosts}"
    pairs = [pair_units[k] for k in keys] if all(k in pair_units for k in keys) else None  # None: a task lacks full
    return {
        "accuracy_ci": stats.bootstrap_ci([acc_units[k] for k in keys], f"{name}|accuracy", rounds),
        "delta_ci": None if pairs is None else stats.bootstrap_ci(pairs, f"{name}|delta", rounds),
        "paired": None if pairs is None else sum(len(unit) for units in pairs for unit in units),
    }


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a JSONL file written by `run_eval` (to re-summarise or merge runs)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
