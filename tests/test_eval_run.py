"""`apb eval`: the runner's rows and summary (one real tiny run with the embedded model, one with a fake
Session for the hosts bookkeeping), the summary arithmetic, and the CLI's one-line errors.

The real run keeps the whole path alive (task generation -> Session.answer with the answer prefix -> scoring ->
JSONL) in about a minute on two cores; it checks structure, never accuracy values, which belong in
docs/quality.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from apb_cli.eval import format_cell
from apb_cli.main import app
from apb_cli.options import parse_tokens
from apb_core.api import AskRequest, AskResult
from apb_core.errors import InputError
from apb_core.eval.runner import EvalConfig, read_rows, run_eval, summarise

ROW_KEYS = {
    "task", "index", "seed", "length", "sample_tokens", "prompt_tokens", "depth", "method", "hosts",
    "reused_from_hosts", "anchor_len", "passing_len", "auto_exact", "ablation", "digest", "metric", "expected",
    "answer_prefix", "answer", "score", "correct", "generated_tokens", "timings", "model", "device",
    "compressor", "question_in_anchor", "haystack", "workers",
}


def test_tiny_real_run_writes_rows_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    # auto-exact off: at 1K tokens apb would run the exact layout; the compressed path is the one to keep alive
    # the two hosts share one worker process (--workers 1): the path of the GPU tables at H = 4 and 8
    config = EvalConfig(tasks=["niah_single_1", "passkey"], lengths=[1024], samples=2, methods=["full", "apb"],
                        hosts=[2], max_new_tokens=8, ablation={"auto_exact": False}, workers=[1])
    summary = run_eval(config, out_path=out)

    rows = read_rows(out)
    assert len(rows) == summary.rows == 2 * 2 * 2
    for row in rows:
        assert set(row) == ROW_KEYS
        assert re.fullmatch(r"[0-9a-f]{16}", row["digest"])
        assert 0.0 <= row["score"] <= 1.0 and row["correct"] == (row["score"] == 1.0)
        assert row["length"] == 1024 and row["sample_tokens"] <= 1024 and row["hosts"] == 2 and row["workers"] == 1
        assert row["reused_from_hosts"] is None and row["generated_tokens"] <= 8
        assert row["answer_prefix"] and not row["answer"].startswith(row["answer_prefix"])  # continuation only
        assert {"prefill_s", "decode_s", "total_s"} <= set(row["timings"])
    by_sample: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_sample.setdefault((row["task"], row["index"]), {})[row["method"]] = row
    assert sorted(by_sample) == [("niah_single_1", 0), ("niah_single_1", 1), ("passkey", 0), ("passkey", 1)]
    for pair in by_sample.values():  # both methods were asked the same prompt
        assert pair["full"]["digest"] == pair["apb"]["digest"] and pair["full"]["expected"] == pair["apb"]["expected"]
        assert pair["full"]["passing_len"] == "all" and pair["apb"]["anchor_len"] > 0
        # each row records what ran: full compresses nothing, apb (auto-exact off) the query-aware scorer
        assert pair["full"]["compressor"] == "none" and pair["apb"]["compressor"] == "query_aware"
        assert pair["apb"]["question_in_anchor"] and not pair["apb"]["auto_exact"]

    cells = {(c.task, c.method, c.hosts): c for c in summary.cells}
    assert set(cells) == {(t, m, 2) for t in ("niah_single_1", "passkey") for m in ("full", "apb")}
    assert all(c.samples == 2 and 0.0 <= c.accuracy <= 100.0 for c in cells.values())
    assert all(cells[(t, "full", 2)].delta_vs_full == 0.0 for t in ("niah_single_1", "passkey"))
    assert {(a.method, a.hosts) for a in summary.averages} == {("full", 2), ("apb", 2)}
    assert any("2 sample(s)" in note for note in summary.notes)
    json.dumps(summary.to_dict(), allow_nan=False)  # what `--json` prints


class _FakeSession:
    """Stands in for apb_core.ask.Session: the real tokenizer (the generators size with it), canned answers."""

    calls: list[tuple[int, AskRequest]] = []

    def __init__(self, request: Any, on_event: Any = None, start_method: str | None = None) -> None:
        from apb_core import models

        self.hosts = request.hosts
        self.tokenizer = models.load_tokenizer(models.resolve_model(None))
        self.window = 8192

    def __enter__(self) -> _FakeSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def answer(self, document: str, question: str, index: int = 0, answer_prefix: str = "",
               t_start: float | None = None, settings: AskRequest | None = None) -> AskResult:
        assert settings is not None
        _FakeSession.calls.append((self.hosts, settings))
        # full finds the needle, apb does not: the summary must show -100 for apb
        number = re.search(r"is: (\d+)\.", document)
        text = number.group(1) if settings.method == "full" and number else "no idea"
        return AskResult(question=question, answer=text, model="fake", method=settings.method, hosts=self.hosts,
                         device="cpu", prompt_tokens=500, context_tokens=450, generated_tokens=3, anchor_len=0,
                         passing_len=0, timings={"prefill_s": 1.0, "decode_s": 0.5, "total_s": 1.5},
                         prefill_tokens_per_s=450.0)


def test_full_runs_once_and_is_reused_for_other_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import apb_core.ask

    monkeypatch.setattr(apb_core.ask, "Session", _FakeSession)
    _FakeSession.calls = []
    config = EvalConfig(tasks=["niah_single_1"], lengths=[512], samples=2, methods=["full", "star", "apb"],
                        hosts=[2, 4], ablation={"compressor": "random", "passing_len": 0})
    summary = run_eval(config, out_path=tmp_path / "rows.jsonl")

    asked = [(h, s.method) for h, s in _FakeSession.calls]
    assert asked.count((2, "full")) == 2 and (4, "full") not in asked  # full ran once per sample, at H=2
    assert asked.count((4, "apb")) == 2 and asked.count((4, "star")) == 2
    for _, settings in _FakeSession.calls:  # ablations reach apb only
        assert (settings.compressor == "random") == (settings.method == "apb")
        assert (settings.passing_len == 0) == (settings.method == "apb")
    rows = read_rows(tmp_path / "rows.jsonl")
    assert len(rows) == 2 * 3 * 2
    reused = [r for r in rows if r["reused_from_hosts"] is not None]
    assert len(reused) == 2 and all(r["method"] == "full" and r["hosts"] == 4 and r["reused_from_hosts"] == 2
                                    for r in reused)
    cells = {(c.method, c.hosts): c for c in summary.cells}
    assert cells[("full", 4)].reused_full and cells[("full", 4)].accuracy == 100.0
    assert cells[("apb", 4)].delta_vs_full == -100.0 and cells[("star", 2)].delta_vs_full == -100.0
    assert any("reused for H=4" in note for note in summary.notes)


def test_summarise_averages_tasks_and_deltas() -> None:
    def row(task: str, method: str, score: float, hosts: int = 2) -> dict[str, Any]:
        return {"length": 4096, "task": task, "method": method, "hosts": hosts, "score": score,
                "reused_from_hosts": None}

    rows = [row("a", "full", 1.0), row("a", "full", 0.5), row("a", "apb", 1.0), row("a", "apb", 0.0),
            row("b", "full", 0.0), row("b", "apb", 1.0)]
    cells, averages = summarise(rows)
    acc = {(c.task, c.method): (c.accuracy, c.delta_vs_full) for c in cells}
    assert acc[("a", "full")] == (75.0, 0.0) and acc[("a", "apb")] == (50.0, -25.0)
    assert acc[("b", "apb")] == (100.0, 100.0)
    avg = {a.method: (a.accuracy, a.delta_vs_full, a.samples) for a in averages}
    assert avg["apb"] == (75.0, 37.5, 3) and avg["full"] == (37.5, 0.0, 3)


def test_parse_length_and_cells() -> None:
    assert [parse_tokens(x) for x in ("4k", "7.5k", "8K", "4000")] == [[4096], [7680], [8192], [4000]]
    for bad in ("0", "-1k", "4q", "1.5", "nan"):
        with pytest.raises(InputError):
            parse_tokens(bad)
    assert format_cell({"accuracy": 66.666, "delta_vs_full": -33.333}, "apb") == "66.7 (-33.3)"
    assert format_cell({"accuracy": 100.0, "delta_vs_full": 0.0}, "full") == "100.0"
    assert format_cell(None, "star") == "-"


@pytest.mark.parametrize("args", [
    ["--methods", "full,ring"],
    ["--tasks", "niah_single_9"],
    ["--len", "4q"],
    ["--hosts", "2,0"],
    ["--passing-len", "some"],
    ["--compressor", "retaining_heads"],
    ["--samples", "0"],
    ["--samples", "many"],  # click's own type error, made one line by apb_cli.main
])
def test_bad_option_is_one_line_exit_2(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", *args, "--device", "cpu", "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("apb: error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "x.jsonl").exists()  # nothing ran


class _SplitSession(_FakeSession):
    """answer_all as Session does it: full finds every key's number; apb over one shared prefill only the first."""

    def answer_all(self, document: str, questions: list[str], index: int = 0,
                   answer_prefixes: list[str] | None = None, t_start: float | None = None,
                   settings: AskRequest | None = None) -> list[AskResult]:
        assert settings is not None and answer_prefixes and len(answer_prefixes) == len(questions)
        _FakeSession.calls.append((self.hosts, settings))
        results = []
        for j, question in enumerate(questions):
            key = re.search(r"for (\S+) mentioned", question).group(1)
            number = re.search(rf"for {key} is: (\d+)\.", document).group(1)
            text = "no idea" if settings.shared_prefill and j > 0 else number
            results.append(AskResult(question=question, answer=text, model="fake", method=settings.method,
                                     hosts=self.hosts, device="cpu", prompt_tokens=500, context_tokens=450,
                                     generated_tokens=3, anchor_len=0, passing_len=0,
                                     timings={"prefill_s": 1.0, "decode_s": 0.5, "total_s": 1.5},
                                     prefill_tokens_per_s=450.0, shared_prefill=bool(settings.shared_prefill)))
        return results


def test_split_questions_ask_every_key_with_and_without_a_shared_prefill(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import apb_core.ask

    monkeypatch.setattr(apb_core.ask, "Session", _SplitSession)
    _FakeSession.calls = []
    config = EvalConfig(tasks=["niah_multiquery"], lengths=[1024], samples=1, methods=["full", "apb"], hosts=[2],
                        split_questions=True)
    summary = run_eval(config, out_path=tmp_path / "rows.jsonl")
    assert [(s.method, s.shared_prefill) for _, s in _FakeSession.calls] == [
        ("full", False), ("apb", False), ("apb", True)]
    rows = read_rows(tmp_path / "rows.jsonl")
    assert [(r["method"], r["question"]) for r in rows] == [
        (m, j) for m in ("full", "apb", "apb+shared") for j in range(4)]
    assert all(len(r["expected"]) == 1 and r["asked"].endswith("mentioned in the provided text?") for r in rows)
    cells = {c.method: c for c in summary.cells}
    assert cells["apb"].accuracy == 100.0 and cells["apb+shared"].accuracy == 25.0
    assert cells["apb+shared"].delta_vs_full == -75.0
    with pytest.raises(InputError, match="split-questions"):
        run_eval(EvalConfig(tasks=["niah_single_1"], lengths=[1024], split_questions=True))


class _ReuseSession(_SplitSession):
    """answer_all(prefill_for=j) as Session does it: one prefill made for question j answers them all; here only
    j's own question finds its key's number over it."""

    calls_for: list[int | None] = []

    def answer_all(self, document: str, questions: list[str], index: int = 0,
                   answer_prefixes: list[str] | None = None, t_start: float | None = None,
                   settings: AskRequest | None = None, prefill_for: int | None = None) -> list[AskResult]:
        from dataclasses import replace

        _ReuseSession.calls_for.append(prefill_for)
        results = super().answer_all(document, questions, index, answer_prefixes, t_start, settings)
        if prefill_for is None:
            return results
        return [r if j == prefill_for else replace(r, answer="no idea") for j, r in enumerate(results)]


def test_reuse_prefill_answers_every_key_over_another_keys_prefill(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--reuse-prefill: each key's question over its own prefill (apb) and over the prefill made for the key
    before it (apb+reuse), four prefills for both, then the shared prefill's rows as without it."""
    import apb_core.ask

    monkeypatch.setattr(apb_core.ask, "Session", _ReuseSession)
    _FakeSession.calls, _ReuseSession.calls_for = [], []
    config = EvalConfig(tasks=["niah_multiquery"], lengths=[1024], samples=1, methods=["apb"], hosts=[2],
                        split_questions=True, reuse_prefill=True)
    summary = run_eval(config, out_path=tmp_path / "rows.jsonl")
    assert _ReuseSession.calls_for == [0, 0, 0, 0, None]
    assert [s.shared_prefill for _, s in _FakeSession.calls] == [False] * 4 + [True]
    rows = read_rows(tmp_path / "rows.jsonl")
    assert [(r["method"], r["question"], r.get("prefill_question")) for r in rows] == [
        *[row for j in range(4) for row in (("apb", j, j), ("apb+reuse", (j + 1) % 4, j))],
        *[("apb+shared", j, None) for j in range(4)]]
    assert {c.method: c.accuracy for c in summary.cells} == {"apb": 100.0, "apb+reuse": 0.0, "apb+shared": 25.0}
    assert summary.rows == 12 and summary.config["reuse_prefill"] is True
    with pytest.raises(InputError, match="reuse-prefill"):
        run_eval(EvalConfig(tasks=["niah_multiquery"], lengths=[1024], methods=["full"], split_questions=True,
                            reuse_prefill=True))
