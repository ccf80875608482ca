"""Fuzz `apb ask` end to end (in process, typer's CliRunner): whatever the document bytes and the options, the
command exits 0, 1 or 2, never shows a traceback, never hangs, and says what went wrong in one stderr line.

The engine is replaced by a fake `run_ask` that checks what reaches it (an option the CLI let through must be a
value the engine can use), so no model runs; the default model is resolved by a stand-in. Documents are read
for real (apb_core.documents), from files and from stdin. tests/test_documents.py fuzzes the reader itself;
this file fuzzes the path from argv to the engine's door. FUZZ_N=3000 makes a longer hunt.
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from apb_cli import options as cli_options
from apb_cli.main import app
from apb_core.api import AskRequest, AskResult, Event, HostStats
from apb_core.documents import MAX_BYTES
from apb_core.errors import InputError

try:  # pytest's default "prepend" import mode puts tests/ on sys.path
    from test_documents import make_text_pdf
except ImportError:  # tests/ made a package
    from tests.test_documents import make_text_pdf

runner = CliRunner()
EXAMPLE_LIMIT_S = 20  # one CLI call taking longer than this counts as a hang
# derandomize: CI runs the same examples every time (a red CI must be reproducible); FUZZ_RANDOM=1 (and
# FUZZ_N) explore further
FUZZ = settings(
    deadline=None, database=None, derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Hang(BaseException):
    """Raised by the alarm inside a CLI call that ran too long (a BaseException: the CLI must not catch it)."""


@pytest.fixture
def no_hang() -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"apb ask ran longer than {EXAMPLE_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def fake_run_ask(request: AskRequest, on_event: Any = None) -> list[AskResult]:
    """The engine's door: every value here came through the CLI's checks, so it must be usable."""
    emit = on_event or (lambda event: None)
    assert request.questions and all(q.strip() for q in request.questions)
    assert request.document.strip()
    assert 1 <= request.hosts and request.device in ("cpu", "cuda")
    assert request.method in ("apb", "star", "full") and request.truncate in ("none", "middle", "end")
    assert request.max_new_tokens >= 1
    assert request.temperature >= 0 and not math.isnan(request.temperature)
    assert 0 < request.top_p <= 1
    assert request.anchor_len is None or request.anchor_len >= 0
    assert request.passing_len is None or request.passing_len == "all" or request.passing_len >= 0
    assert request.threads is None or request.threads >= 1
    results = []
    for qi, question in enumerate(request.questions):
        emit(Event("progress", rank=0, phase="prefill", done=1, total=1, question=qi))
        emit(Event("token", text="fine.", question=qi))
        results.append(
            AskResult(
                question=question,
                answer="fine.",
                model="fake",
                method=request.method,
                hosts=request.hosts,
                device=request.device,
                prompt_tokens=10,
                context_tokens=5,
                generated_tokens=1,
                anchor_len=0,
                passing_len=0,
                timings={"load_s": 0.0, "tokenize_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "total_s": 0.0},
                prefill_tokens_per_s=float("inf"),
                host_stats=[HostStats(0, 5, 0, 0, 0.0)],
            )
        )
    return results


def _module(monkeypatch: pytest.MonkeyPatch, name: str) -> types.ModuleType:
    """The real module if it imports; otherwise (being restructured) a stand-in registered under its name."""
    try:
        return importlib.import_module(name)
    except Exception:
        stub = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, stub)
        return stub


def _missing_path_only(spec: str, allow_pickle: bool = False) -> Any:
    """The check of `resolve_model` these tests rely on, for while apb_core.models does not provide it."""
    if not os.path.exists(spec):
        raise InputError(f"model not found: {spec}")
    return types.SimpleNamespace(name=os.path.basename(spec))


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch, no_hang: None) -> None:
    models = _module(monkeypatch, "apb_core.models")
    real_resolve_model = getattr(models, "resolve_model", _missing_path_only)

    def stand_in_resolve_model(spec: str | None, allow_pickle: bool = False) -> Any:
        """The embedded model needs no install here; any other spec goes through the real checks."""
        if spec is None:
            return types.SimpleNamespace(name="stand-in default model")
        return real_resolve_model(spec, allow_pickle=allow_pickle)

    monkeypatch.setattr(_module(monkeypatch, "apb_core.ask"), "run_ask", fake_run_ask, raising=False)
    monkeypatch.setattr(models, "resolve_model", stand_in_resolve_model, raising=False)
    monkeypatch.setattr(cli_options, "cuda_count", lambda: 0)  # the same answers on a GPU machine


def run_cli(args: list[str], stdin: bytes | None = None) -> Any:
    """Invoke `apb ask`, check the contract every outcome must keep, return the result."""
    signal.setitimer(signal.ITIMER_REAL, EXAMPLE_LIMIT_S)
    try:
        result = runner.invoke(app, ["ask", *args], input=stdin)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a crash inside the CLI (CliRunner would only keep it)
    everything = result.stdout + result.stderr
    assert result.exit_code in (0, 1, 2), (result.exit_code, everything)
    assert "Traceback" not in everything, everything
    if result.exit_code:
        *before, last = result.stderr.splitlines() or [""]
        assert last.startswith("apb: error: ") and "apb: error:" not in "".join(before), result.stderr
        # what may come before the error line: the document's warnings, the header of a question being
        # answered (more than one question); never with --quiet
        assert all(line.startswith(("apb: warning: ", "Q: ")) for line in before), result.stderr
        assert result.stdout == ""
    return result


# -- documents ----------------------------------------------------------------------------------------------------
_PDF = make_text_pdf(["The fox is quick.", "The dog is lazy.", "Page three has the passcode 7481."])


@st.composite
def damaged_pdf(draw: st.DrawFn) -> bytes:
    """A valid PDF cut short and/or with bytes overwritten."""
    data = bytearray(_PDF)
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


# pieces of text that trip readers up: NULs, lone continuation bytes, truncated sequences, BOMs, controls
_PIECES = [
    b"\x00",
    b"\xff",
    b"\x80",
    b"\xc3",
    b"\xe2\x82",
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\xfe\xff",
    b"\r\n",
    b"\r",
    b"\x1b[31m",
    b"\x07",
    b"\x0c",
    "é".encode(),
    "🦊".encode(),
    "é".encode("latin-1"),
    b" ",
    b"\n",
    b"The quick brown fox. ",
    b"%PDF-1.7\n",
]
documents = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.sampled_from(_PIECES), max_size=200).map(b"".join),
    st.text(max_size=500).map(lambda t: t.encode("utf-8", "surrogatepass")),
    damaged_pdf(),
)


@settings(FUZZ, max_examples=int(os.environ.get("FUZZ_N", 120)))
@given(data=documents, suffix=st.sampled_from([".txt", ".pdf", ".md", ""]))
def test_any_document_bytes(tmp_path: Path, fake_engine: None, data: bytes, suffix: str) -> None:
    path = tmp_path / f"doc{suffix}"
    path.write_bytes(data)
    result = run_cli([str(path), "What is the passcode?"])
    assert result.exit_code in (0, 2), result.stderr
    if result.exit_code == 0:
        assert result.stdout == "fine.\n"


@settings(FUZZ, max_examples=40)
@given(data=documents)
def test_any_stdin_bytes(fake_engine: None, data: bytes) -> None:
    result = run_cli(["-", "What is the passcode?", "--json"], stdin=data)
    assert result.exit_code in (0, 2), result.stderr


def test_gigantic_line_is_read(tmp_path: Path, fake_engine: None) -> None:
    path = tmp_path / "one-line.txt"
    path.write_bytes(b"fox " * (4 << 20))  # 16 MiB without a newline
    assert run_cli([str(path), "q?", "--quiet"]).exit_code == 0


def test_document_over_the_size_limit_is_refused_without_reading_it(tmp_path: Path, fake_engine: None) -> None:
    path = tmp_path / "huge.txt"
    with open(path, "wb") as fh:  # sparse: no disk used
        fh.truncate(MAX_BYTES + 1)
    result = run_cli([str(path), "q?"])
    assert result.exit_code == 2 and "larger than" in result.stderr


# -- options ---------------------------------------------------------------------------------------------------------
_NUMBERS = [
    "0",
    "-0",
    "-1",
    "-5",
    "1",
    "2",
    "3",
    "1e9",
    "1e-300",
    "1e309",
    "-1e309",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "0.5",
    "1.0000001",
    "0x10",
    "1_000",
    str(10**12),
    str(-(10**12)),
    str(2**63),
    str(10**100),
    " 7",
    "7 ",
    "",
    "all",
    "ALL",
    "None",
]
_argv_text = st.text(st.characters(blacklist_characters="\x00"), max_size=30)  # argv strings hold no NUL
_values = st.one_of(
    st.sampled_from(_NUMBERS),
    st.integers(-(10**15), 10**15).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    _argv_text,
)
_VALUED = [
    "--hosts",
    "--anchor-len",
    "--passing-len",
    "--max-new-tokens",
    "--temperature",
    "--top-p",
    "--seed",
    "--threads",
    "--device",
    "--method",
    "--truncate",
    "--stop",
    "-q",
    "--question",
    "--model",
]
_CHOICES = {
    "--device": ["auto", "cpu", "cuda", "tpu", ""],
    "--method": ["apb", "star", "full", "ring"],
    "--truncate": ["none", "middle", "end", "start"],
}
_FLAGS = ["--json", "--quiet", "--allow-pickle", "--help", "--bogus", "-x", "--hosts"]


@st.composite
def options(draw: st.DrawFn) -> list[str]:
    args: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(_VALUED))
            choices = _CHOICES.get(name)
            value = draw(st.sampled_from(choices) if choices and draw(st.booleans()) else _values)
            args += [f"{name}={value}"] if draw(st.integers(0, 4)) == 0 else [name, value]
        else:
            args.append(draw(st.sampled_from(_FLAGS)))
    return args


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text("The secret passcode for the north archive is 7481.\n")
    return path


@settings(FUZZ, max_examples=int(os.environ.get("FUZZ_N", 400)))
@given(opts=options(), question=st.one_of(st.none(), _argv_text))
def test_any_options(doc: Path, fake_engine: None, opts: list[str], question: str | None) -> None:
    args = [str(doc)] + ([question] if question is not None else []) + opts
    run_cli(args)


def test_quiet_failure_is_one_line(doc: Path, fake_engine: None) -> None:
    result = run_cli([str(doc), "first?", "-q", "second?", "--model", "/no/such/model", "--quiet"])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "args,word",
    [
        (["--hosts", str(10**12)], "--hosts"),
        (["--max-new-tokens", "-5"], "--max-new-tokens"),
        (["--top-p", "nan"], "--top-p"),
        (["--temperature", "nan"], "--temperature"),
        (["--anchor-len", "1e9"], "--anchor-len"),
        (["--anchor-len", str(10**9)], None),
        (["--passing-len", "1e9"], "--passing-len"),
        (["--hosts", "1e12"], "--hosts"),
        (["--seed", str(10**30)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--temperature", "inf"], "--temperature"),
        (["--threads", "100000"], "--threads"),
        (["--dtype", "int8"], "--dtype"),
    ],
)
def test_absurd_numbers(doc: Path, fake_engine: None, args: list[str], word: str | None) -> None:
    """Either refused (exit 2, the option named) or handed to the engine as a usable value."""
    result = run_cli([str(doc), "q?", *args])
    if word is None:
        assert result.exit_code == 0
    else:
        assert result.exit_code == 2 and word in result.stderr, result.stderr
