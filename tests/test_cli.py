"""`apb` command line: bad input is one stderr line with exit 2 before any model work; stdout holds only the
answer (or one JSON object); engine errors keep their exit codes.

The engine (`apb_core.ask.run_ask`) is replaced by a fake that emits events and returns `AskResult`s, so
these tests run in a second and check the CLI alone. The real engine's own limits (a prompt longer than the
window) are tested by the engine's tests.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from apb_cli import handler, options
from apb_cli.main import app
from apb_core.api import AskRequest, AskResult, Event, HostStats
from apb_core.errors import ApbError, InputError, WorkerError

try:  # pytest's default "prepend" import mode puts tests/ on sys.path
    from test_documents import make_blank_pdf, make_encrypted_pdf, make_text_pdf
except ImportError:  # tests/ made a package
    from tests.test_documents import make_blank_pdf, make_encrypted_pdf, make_text_pdf

JSON_KEYS = {
    "answer",
    "model",
    "method",
    "hosts",
    "device",
    "prompt_tokens",
    "context_tokens",
    "generated_tokens",
    "anchor_len",
    "passing_len",
    "timings",
    "prefill_tokens_per_s",
}
TIMING_KEYS = {"load_s", "tokenize_s", "prefill_s", "decode_s", "total_s"}

runner = CliRunner()


def _module(monkeypatch: pytest.MonkeyPatch, name: str) -> types.ModuleType:
    """The real module if it imports; otherwise (still being written) a stand-in registered under its name."""
    try:
        return importlib.import_module(name)
    except Exception:
        stub = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, stub)
        return stub


def _contract_resolve_model(spec: str | None, allow_pickle: bool = False) -> Any:
    """`resolve_model` as CONTRACTS.md describes it, for when apb_core/models is not there yet."""
    if spec is None:
        return types.SimpleNamespace(name="stand-in default model")
    path = Path(spec)
    if not path.exists():
        raise InputError(f"model not found: {spec}")
    if path.is_dir() and not allow_pickle and not list(path.glob("*.safetensors")):
        raise InputError(f"refusing pickle checkpoint in {spec}; pass --allow-pickle to load it")
    return types.SimpleNamespace(name=path.name)


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace run_ask with a fake; the dict controls it and records what it was asked.

    keys: "requests" (AskRequests received), "answers" (text per question), "stream" (emit token events),
    "raise" (an exception to raise after the first token), "calls" (run_ask call count).
    """
    state: dict[str, Any] = {"requests": [], "answers": None, "stream": True, "raise": None, "calls": 0}

    def fake_run_ask(request: AskRequest, on_event: Callable[[Event], None] | None = None) -> list[AskResult]:
        state["calls"] += 1
        state["requests"].append(request)
        emit = on_event or (lambda event: None)
        results = []
        for qi, question in enumerate(request.questions):
            answer = (state["answers"] or [f"Answer {qi + 1}: 7481."] * len(request.questions))[qi]
            for rank in range(request.hosts):
                emit(Event("phase", rank=rank, phase="load", question=qi))
                for layer in range(3):
                    emit(Event("progress", rank=rank, phase="prefill", done=layer + 1, total=3, question=qi))
            pieces = [answer[i : i + 3] for i in range(0, len(answer), 3)]
            for n, piece in enumerate(pieces, start=1):
                if state["stream"]:
                    emit(Event("token", text=piece, question=qi))
                emit(Event("progress", phase="decode", done=n, total=request.max_new_tokens, question=qi))
                if state["raise"] is not None:
                    raise state["raise"]
            emit(Event("log", rank=1, text="done"))
            results.append(
                AskResult(
                    question=question,
                    answer=answer,
                    model="fake-model",
                    method=request.method,
                    hosts=request.hosts,
                    device=request.device,
                    prompt_tokens=120,
                    context_tokens=100,
                    generated_tokens=len(pieces),
                    anchor_len=8,
                    passing_len=request.passing_len if request.passing_len is not None else 16,
                    timings={"load_s": 0.5, "tokenize_s": 0.01, "prefill_s": 0.2, "decode_s": 0.1, "total_s": 0.9},
                    prefill_tokens_per_s=state.get("tps", 500.0),
                    host_stats=[HostStats(r, 50, 8, 16 * r, 0.2) for r in range(request.hosts)],
                )
            )
        return results

    monkeypatch.setattr(_module(monkeypatch, "apb_core.ask"), "run_ask", fake_run_ask, raising=False)
    model = _module(monkeypatch, "apb_core.models")
    if not hasattr(model, "resolve_model"):
        monkeypatch.setattr(model, "resolve_model", _contract_resolve_model, raising=False)
    return state


@pytest.fixture
def no_model_work(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Fail loudly if bad input gets as far as the engine."""
    calls = {"run_ask": 0}

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        calls["run_ask"] += 1
        raise AssertionError("run_ask must not be called for bad input")

    monkeypatch.setattr(_module(monkeypatch, "apb_core.ask"), "run_ask", forbidden, raising=False)
    model = _module(monkeypatch, "apb_core.models")
    if not hasattr(model, "resolve_model"):
        monkeypatch.setattr(model, "resolve_model", _contract_resolve_model, raising=False)
    return calls


def invoke(*args: str, input: bytes | None = None, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), input=input, env=env)


def assert_one_line_error(result: Any, code: int = 2) -> str:
    """Exit `code`, nothing on stdout, exactly one non-empty line on stderr, no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text("The secret passcode for the north archive is 7481.\n")
    return path


# -- bad input: exit 2, one line, nothing on stdout, the file untouched --------------------------------------
def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a word the error line must contain). Creates the files it names."""

    def file(name: str, data: bytes) -> str:
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    good = file("good.txt", b"A fine document.\n")
    pickle_dir = tmp_path / "pickle_model"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text('{"model_type": "llama"}')
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return {
        "missing path": ([str(tmp_path / "nope.txt"), "q?"], "no such file"),
        "directory": ([str(tmp_path), "q?"], "directory"),
        "empty file": ([file("empty.txt", b""), "q?"], "empty"),
        "whitespace file": ([file("blank.txt", b" \n\t\n"), "q?"], "whitespace"),
        "binary file": ([file("bin.txt", b"\x7fELF\x02\x01\x01\x00" + bytes(200)), "q?"], "binary"),
        "invalid utf-8": ([file("latin.txt", "éàüöçñ".encode("latin-1") * 30), "q?"], "UTF-8"),
        "corrupt pdf": ([file("bad.pdf", b"%PDF-1.4\n1 0 obj garbage"), "q?"], "PDF"),
        "encrypted pdf": ([file("locked.pdf", make_encrypted_pdf("pw")), "q?"], "password"),
        "scanned pdf": ([file("scan.pdf", make_blank_pdf(2)), "q?"], "no text layer"),
        "empty question": ([good, "   "], "empty"),
        "no question": ([good], "no question"),
        "empty extra question": ([good, "ok?", "-q", ""], "question 2 is empty"),
        "hosts 0": ([good, "q?", "--hosts", "0"], "--hosts"),
        "hosts negative": ([good, "q?", "--hosts", "-3"], "--hosts"),
        "hosts not a number": ([good, "q?", "--hosts", "two"], "--hosts"),
        "cuda hosts 99": ([good, "q?", "--device", "cuda", "--hosts", "99"], "cuda"),
        "bad device": ([good, "q?", "--device", "tpu"], "--device"),
        "bad method": ([good, "q?", "--method", "ring"], "--method"),
        "bad truncate": ([good, "q?", "--truncate", "start"], "--truncate"),
        "passing-len word": ([good, "q?", "--passing-len", "some"], "--passing-len"),
        "passing-len negative": ([good, "q?", "--passing-len", "-1"], "--passing-len"),
        "anchor-len negative": ([good, "q?", "--anchor-len", "-5"], "--anchor-len"),
        "max-new-tokens 0": ([good, "q?", "--max-new-tokens", "0"], "--max-new-tokens"),
        "temperature negative": ([good, "q?", "--temperature", "-0.1"], "--temperature"),
        "temperature nan": ([good, "q?", "--temperature", "nan"], "--temperature"),
        "top-p 0": ([good, "q?", "--top-p", "0"], "--top-p"),
        "top-p above 1": ([good, "q?", "--top-p", "1.5"], "--top-p"),
        "threads 0": ([good, "q?", "--threads", "0"], "--threads"),
        "unknown option": ([good, "q?", "--colour"], "--colour"),
        "unknown model path": ([good, "q?", "--model", str(tmp_path / "no-such-model")], "no-such-model"),
        "pickle checkpoint": ([good, "q?", "--model", str(pickle_dir)], "pickle"),
    }


BAD_INPUT_NAMES = [
    "missing path", "directory", "empty file", "whitespace file", "binary file", "invalid utf-8", "corrupt pdf",
    "encrypted pdf", "scanned pdf", "empty question", "no question", "empty extra question", "hosts 0",
    "hosts negative", "hosts not a number", "cuda hosts 99", "bad device", "bad method", "bad truncate",
    "passing-len word", "passing-len negative", "anchor-len negative", "max-new-tokens 0",
    "temperature negative", "temperature nan", "top-p 0", "top-p above 1", "threads 0", "unknown option",
    "unknown model path", "pickle checkpoint",
]  # fmt: skip


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_bad_input_is_one_line_exit_2(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_work: dict[str, int]
) -> None:
    monkeypatch.setattr(options, "cuda_count", lambda: 0)  # "no GPUs here", also on a GPU machine
    cases = _bad_inputs(tmp_path)
    assert sorted(cases) == sorted(BAD_INPUT_NAMES)
    args, word = cases[case]
    before = _snapshot(tmp_path)
    line = assert_one_line_error(invoke("ask", *args))
    assert line.startswith("apb: error: ")
    assert word.lower() in line.lower()
    assert _snapshot(tmp_path) == before
    assert no_model_work["run_ask"] == 0


def test_options_are_checked_before_the_document(tmp_path: Path, no_model_work: dict[str, int]) -> None:
    line = assert_one_line_error(invoke("ask", str(tmp_path / "missing.txt"), "q?", "--hosts", "0"))
    assert "--hosts" in line


def test_document_is_checked_before_the_model(tmp_path: Path, no_model_work: dict[str, int]) -> None:
    line = assert_one_line_error(invoke("ask", str(tmp_path / "missing.txt"), "q?", "--model", "/no/model"))
    assert "missing.txt" in line


def test_hosts_beyond_visible_gpus(doc: Path, monkeypatch: pytest.MonkeyPatch, no_model_work: Any) -> None:
    monkeypatch.setattr(options, "cuda_count", lambda: 2)
    line = assert_one_line_error(invoke("ask", str(doc), "q?", "--device", "cuda", "--hosts", "3", "--workers", "3"))
    assert "--workers 3 needs 3 GPUs but only 2" in line
    line = assert_one_line_error(invoke("ask", str(doc), "q?", "--hosts", "4", "--workers", "3"))  # auto: cuda
    assert "--workers 3 must divide --hosts 4" in line


# -- the answer on stdout, everything else on stderr ------------------------------------------------------
def test_streamed_answer_is_all_of_stdout(doc: Path, engine: dict[str, Any]) -> None:
    engine["answers"] = ["The passcode is 7481."]
    result = invoke("ask", str(doc), "What is the passcode?")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "The passcode is 7481.\n"
    assert "Timings" in result.stderr and "prefill" in result.stderr
    assert "Hosts" in result.stderr and "passing recv" in result.stderr
    assert "Traceback" not in result.stderr


def test_request_carries_the_options(doc: Path, engine: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "cuda_count", lambda: 0)
    result = invoke(
        "ask", str(doc), "first?", "-q", "second?", "--question", "third?",
        "--method", "star", "--anchor-len", "64", "--passing-len", "ALL", "--max-new-tokens", "7",
        "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--stop", "\n\n", "--stop", "END",
        "--truncate", "middle", "--threads", "1", "--quiet", "--hosts", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    (request,) = engine["requests"]
    assert request.document == doc.read_text()
    assert request.questions == ["first?", "second?", "third?"]
    assert (request.method, request.hosts, request.device) == ("star", 2, "cpu")
    assert (request.anchor_len, request.passing_len, request.max_new_tokens) == (64, "all", 7)
    assert (request.temperature, request.top_p, request.seed) == (0.7, 0.9, 3)
    assert (request.stop, request.truncate, request.threads, request.model) == (["\n\n", "END"], "middle", 1, None)


def test_defaults_on_cpu_and_on_gpus(doc: Path, engine: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "cuda_count", lambda: 0)
    monkeypatch.setattr(options.os, "cpu_count", lambda: 2)  # small machines run one host (docs/benchmarks.md)
    assert invoke("ask", str(doc), "q?").exit_code == 0
    assert engine["requests"][-1].hosts == 1
    monkeypatch.setattr(options.os, "cpu_count", lambda: 8)
    assert invoke("ask", str(doc), "q?", "--passing-len", "32").exit_code == 0
    request = engine["requests"][-1]
    assert (request.hosts, request.device, request.passing_len, request.max_new_tokens) == (2, "cpu", 32, 128)
    assert (request.temperature, request.top_p, request.seed, request.truncate) == (0.0, 1.0, 0, "none")
    monkeypatch.setattr(options, "cuda_count", lambda: 4)
    assert invoke("ask", str(doc), "q?").exit_code == 0
    assert (engine["requests"][-1].hosts, engine["requests"][-1].device) == (4, "cuda")
    assert invoke("ask", str(doc), "q?", "--device", "cpu").exit_code == 0
    assert (engine["requests"][-1].hosts, engine["requests"][-1].device) == (2, "cpu")


def test_question_may_come_only_from_q(doc: Path, engine: dict[str, Any]) -> None:
    result = invoke("ask", str(doc), "-q", "only?", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert engine["requests"][0].questions == ["only?"]


def test_quiet_prints_nothing_on_stderr(doc: Path, engine: dict[str, Any]) -> None:
    result = invoke("ask", str(doc), "q?", "--quiet")
    assert result.exit_code == 0
    assert result.stderr == ""
    assert result.stdout == "Answer 1: 7481.\n"


def test_json_is_exactly_one_object(doc: Path, engine: dict[str, Any]) -> None:
    result = invoke("ask", str(doc), "q?", "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)  # fails on anything before or after the object
    assert isinstance(payload, dict)
    assert result.stdout.endswith("}\n") and result.stdout.count("\n") == 1
    assert JSON_KEYS <= set(payload)
    assert TIMING_KEYS <= set(payload["timings"])
    assert payload["answer"] == "Answer 1: 7481."
    expected = (options.default_cpu_hosts(), "cpu", "fake-model")
    assert (payload["hosts"], payload["device"], payload["model"]) == expected
    assert "answers" not in payload
    assert "Timings" in result.stderr  # the tables still go to stderr


def test_json_stays_valid_with_non_finite_numbers(doc: Path, engine: dict[str, Any]) -> None:
    engine["tps"] = float("inf")
    result = invoke("ask", str(doc), "q?", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert payload["prefill_tokens_per_s"] is None


def test_json_with_several_questions(doc: Path, engine: dict[str, Any]) -> None:
    engine["answers"] = ["one", "two"]
    result = invoke("ask", str(doc), "a?", "-q", "b?", "--json", "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
    payload = json.loads(result.stdout)
    assert [a["answer"] for a in payload["answers"]] == ["one", "two"]
    assert [a["question"] for a in payload["answers"]] == ["a?", "b?"]
    assert all(JSON_KEYS <= set(a) for a in payload["answers"])
    assert {k: payload[k] for k in JSON_KEYS} == {k: payload["answers"][0][k] for k in JSON_KEYS}


def test_several_questions_stream_in_order(doc: Path, engine: dict[str, Any]) -> None:
    engine["answers"] = ["first answer", "second\nanswer"]
    result = invoke("ask", str(doc), "a?", "-q", "b?")
    assert result.exit_code == 0, result.stderr
    # each answer under a `==> Qn: question <==` line, a blank line between answers (head's convention)
    assert result.stdout == "==> Q1: a? <==\nfirst answer\n\n==> Q2: b? <==\nsecond\nanswer\n"
    assert "Q: a?" not in result.stderr  # stdout names the questions
    assert engine["calls"] == 1  # one model load for all questions
    assert engine["requests"][0].shared_prefill is None  # the engine's default
    parts = re.split(r"^==> Q\d+: .* <==\n", result.stdout, flags=re.MULTILINE)
    assert parts[1:] == ["first answer\n\n", "second\nanswer\n"]  # each answer, then the blank separator line


def test_one_question_stdout_has_no_label(doc: Path, engine: dict[str, Any]) -> None:
    result = invoke("ask", str(doc), "a?", "--quiet")
    assert result.stdout == "Answer 1: 7481.\n"


def test_shared_prefill_option_and_json(doc: Path, engine: dict[str, Any]) -> None:
    result = invoke("ask", str(doc), "a?", "-q", "b?", "--no-shared-prefill", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert engine["requests"][0].shared_prefill is False
    payload = json.loads(result.stdout)
    assert payload["prefill_count"] == 1  # the fake's answers all say prefill 0
    assert [a["prefill"] for a in payload["answers"]] == [0, 0]
    assert "query_s" in payload["timings"]
    assert "Q: a?" not in result.stdout
    invoke("ask", str(doc), "a?", "-q", "b?", "--shared-prefill", "--quiet")
    assert engine["requests"][1].shared_prefill is True


def test_answer_printed_when_engine_does_not_stream(doc: Path, engine: dict[str, Any]) -> None:
    engine["stream"] = False
    engine["answers"] = ["x", ""]
    result = invoke("ask", str(doc), "a?", "-q", "b?", "--quiet")
    assert result.exit_code == 0
    assert result.stdout == "==> Q1: a? <==\nx\n\n==> Q2: b? <==\n\n"


def test_stdin_document(engine: dict[str, Any]) -> None:
    result = invoke("ask", "-", "q?", "--quiet", input=b"piped document text")
    assert result.exit_code == 0, result.stderr
    assert engine["requests"][0].document == "piped document text"


def test_document_warnings_go_to_stderr(tmp_path: Path, engine: dict[str, Any]) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("Le café est fermé le lundi.".encode("latin-1"))
    result = invoke("ask", str(path), "q?")
    assert result.exit_code == 0
    assert "invalid UTF-8" in result.stderr
    assert result.stdout == "Answer 1: 7481.\n"
    assert engine["requests"][0].document == "Le caf\ufffd est ferm\ufffd le lundi."
    quiet = invoke("ask", str(path), "q?", "--quiet")
    assert quiet.stderr == ""


def test_pdf_document(tmp_path: Path, engine: dict[str, Any]) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(make_text_pdf(["Page one.", "Page two."]))
    assert invoke("ask", str(path), "q?", "--quiet").exit_code == 0
    assert engine["requests"][0].document == "Page one.\n\n--- page 2 ---\n\nPage two."


# -- errors from the engine ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "code", "word"),
    [
        (InputError("prompt is 9000 tokens but the model window is 8192"), 2, "9000"),
        (WorkerError("host 1 failed: CUDA out of memory\nsecond line"), 1, "host 1"),
        (ApbError("something failed"), 1, "something"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (RuntimeError("boom"), 1, "boom"),
    ],
)
def test_engine_errors_are_one_line(
    doc: Path, engine: dict[str, Any], error: BaseException, code: int, word: str
) -> None:
    engine["raise"] = error
    for args in (["--json"], ["--quiet", "--json"]):
        result = invoke("ask", str(doc), "q?", *args)
        assert_one_line_error(result, code)
        assert word in result.stderr


def test_engine_error_after_streaming_keeps_partial_answer_on_stdout(doc: Path, engine: dict[str, Any]) -> None:
    engine["raise"] = WorkerError("host 0 died")
    result = invoke("ask", str(doc), "q?", "--quiet")
    assert result.exit_code == 1
    assert result.stderr == "apb: error: host 0 died\n"
    assert result.stdout == "Ans\n"  # what streamed before the failure, with its line ended


def test_apb_debug_shows_traceback(doc: Path, engine: dict[str, Any]) -> None:
    engine["raise"] = RuntimeError("boom")
    result = invoke("ask", str(doc), "q?", "--quiet", env={"APB_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("apb: error: unexpected RuntimeError: boom")


# -- info and help ------------------------------------------------------------------------------------------
def test_info(monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke("info")
    assert result.exit_code == 0, result.stderr
    for word in ("python", "torch", "transformers", "cpu cores", "cuda gpus", "default model"):
        assert word in result.stdout
    payload = json.loads(invoke("info", "--json").stdout)
    assert {"apb", "python", "torch", "transformers", "cpu_cores", "cuda_gpus", "default_model_found"} <= set(payload)


def test_info_reports_a_missing_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(spec: str | None, allow_pickle: bool = False) -> Any:
        raise InputError("default model is not installed")

    monkeypatch.setattr(_module(monkeypatch, "apb_core.models"), "resolve_model", missing, raising=False)
    result = invoke("info", "--json")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["default_model_found"] is False
    assert "not installed" in payload["default_model_error"]


def test_help_lists_every_ask_option() -> None:
    result = invoke("ask", "--help")
    assert result.exit_code == 0
    for option in (
        "--model", "--hosts", "--device", "--method", "--anchor-len", "--passing-len", "--max-new-tokens",
        "--temperature", "--top-p", "--seed", "--stop", "--truncate", "--json", "--question", "--quiet",
        "--allow-pickle", "--threads",
    ):  # fmt: skip
        assert option in result.stdout


# -- apb_cli.options: the pieces every command shares -----------------------------------------------------------
def test_ask_methods_are_the_engines() -> None:
    methods = pytest.importorskip("apb_core.algorithm.methods")
    assert options.METHODS == methods.METHODS


def test_parse_tokens() -> None:
    assert options.parse_tokens("2k,32k, 128k,131072") == [2048, 32768, 131072, 131072]
    assert options.parse_tokens("1m") == [1048576]
    assert [options.parse_tokens(x) for x in ("4k", "7.5k", "8K", "4000")] == [[4096], [7680], [8192], [4000]]
    for bad in ("", ",", "12q", "1.5", "-3k", "k", "0", "nan", "inf", "1e400"):
        with pytest.raises(InputError, match="--len"):
            options.parse_tokens(bad)


def test_parse_passing_len() -> None:
    assert [options.parse_passing_len(x) for x in (None, "ALL", " 7 ", "0", 5)] == [None, "all", 7, 0, 5]
    with pytest.raises(InputError, match="whole number or 'all'"):
        options.parse_passing_len("some")
    with pytest.raises(InputError, match="must not be negative"):
        options.parse_passing_len("-1")


def test_one_cpu_default_for_every_command(monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpu = lambda: 0  # noqa: E731
    for cores, hosts in ((1, 1), (2, 1), (3, 1), (4, 2), (64, 2)):
        monkeypatch.setattr(options.os, "cpu_count", lambda cores=cores: cores)
        assert options.resolve_device_hosts("auto", None, no_gpu) == options.Placement("cpu", hosts, hosts)
    assert options.resolve_device_hosts("cpu", 3, lambda: pytest.fail("cuda_count called for --device cpu")) == (
        options.Placement("cpu", 3, 3)
    )
    assert options.resolve_device_hosts("auto", None, lambda: 4) == options.Placement("cuda", 4, 4)
    with pytest.raises(InputError, match="--device cuda: no CUDA GPU"):
        options.resolve_device_hosts("cuda", None, no_gpu)


def test_workers_placement() -> None:
    """--workers: explicit values must divide the hosts and fit the GPUs; more hosts than GPUs picks the most GPUs
    that divide the hosts and says so; never a silent override of an explicit value."""
    placed = options.resolve_device_hosts("cuda", 3, lambda: 2)
    assert (placed.hosts, placed.workers) == (3, 1) and "3 hosts on 2 GPU(s): 1 worker process" in placed.notes[0]
    placed = options.resolve_device_hosts("cuda", 8, lambda: 2)
    assert placed.workers == 2 and "2 worker process(es) of 4 hosts each, which take turns" in placed.notes[0]
    assert options.resolve_device_hosts("cpu", 4, lambda: 0, workers=2) == options.Placement("cpu", 4, 2)
    assert options.resolve_device_hosts("cpu", 4, lambda: 0, workers=1).notes == ()
    for hosts, workers, match in ((4, 3, "must divide --hosts 4"), (2, 4, "must divide --hosts 2"),
                                  (2, 0, "--workers must be at least 1")):
        with pytest.raises(InputError, match=match):
            options.resolve_device_hosts("cpu", hosts, lambda: 0, workers=workers)
    with pytest.raises(InputError, match="--workers 2 needs 2 GPUs but only 1"):
        options.resolve_device_hosts("cuda", 4, lambda: 1, workers=2)
    _, warnings = options.host_notes("cpu", 8, 8, cores=2, workers=8)
    assert "--workers 2" in warnings[0]
    assert options.host_notes("cpu", 8, 8, cores=2, workers=2) == ((), ())


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (InputError("bad\ninput"), 2, "apb: error: bad input"),
        (WorkerError("host 1 failed"), 1, "apb: error: host 1 failed"),
        (handler.Terminated(), 143, "apb: terminated"),
        (KeyboardInterrupt(), 130, "apb: interrupted"),
        (RuntimeError("boom"), 1, "apb: error: unexpected RuntimeError: boom (set APB_DEBUG=1 for the traceback)"),
    ],
)
def test_run_command_is_the_one_handler(
    error: BaseException, code: int, line: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("APB_DEBUG", raising=False)

    def body() -> int:
        raise error

    assert handler.run_command(body) == code
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", line + "\n")


def test_run_command_turns_sigterm_into_exit_143(capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import signal

    def body() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert handler.run_command(body) == 143
    assert capsys.readouterr().err == "apb: terminated\n"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the command's only


def test_run_command_is_silent_on_a_closed_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handler, "_silence_stdout", lambda: None)  # the test's own stdout stays usable
    lines: list[str] = []
    monkeypatch.setattr(handler, "_fail", lambda line, code: lines.append(line) or code)

    def body() -> int:
        raise BrokenPipeError()

    assert handler.run_command(body) == 1
    assert lines == []


def test_torchrun_follower_prints_nothing(doc: Path, engine: dict[str, Any]) -> None:
    result = invoke("ask", str(doc), "q?", "--json", env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert result.exit_code == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert engine["calls"] == 1  # it computes all the same
    leader = invoke("ask", str(doc), "q?", "--quiet", env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert leader.stdout == "Answer 1: 7481.\n"


def test_compressor_and_retaining_heads_options(tmp_path):
    """--retaining-heads alone means the retaining_heads compressor; retaining_heads without a file, a file with
    another compressor, or a missing file is one InputError."""
    from apb_cli.options import resolve_compressor
    from apb_core.errors import InputError

    heads = tmp_path / "heads.safetensors"
    heads.write_bytes(b"x")
    assert resolve_compressor(None, None) is None
    assert resolve_compressor("random", None) == "random"
    assert resolve_compressor(None, str(heads)) == "retaining_heads"
    for compressor, path, match in [("retaining_heads", None, "needs --retaining-heads"),
                                    ("random", str(heads), "read only by"),
                                    (None, str(tmp_path / "missing"), "no such file"),
                                    ("snapkv", None, "--compressor")]:
        with pytest.raises(InputError, match=match):
            resolve_compressor(compressor, path)
