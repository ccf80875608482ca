"""Issue 13, "the first hour": what a new user ran into, one test (or more) per item, through the CLI.

Most tests drive `apb` with a fake engine (as tests/test_cli.py does) or in a subprocess; the slow ones run the
embedded model: the README's first command on an empty cache (about a minute on 2 cores), and a short real ask.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from apb_cli import options
from apb_cli.main import app
from apb_core.api import AskRequest, AskResult, Event, HostStats
from apb_core.dist.failures import OOM_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.md"
QUESTION = "What is the secret passcode for the north archive?"
runner = CliRunner()

# A script that runs `apb` with run_ask replaced by a fake: for tests that need real file descriptors.
FAKE_APB = """
import sys
import apb_core.ask
from apb_core.api import AskResult, Event

def run_ask(request, on_event=None):
    for rank in range(request.hosts):
        on_event(Event("phase", rank=rank, phase="load"))
        for layer in range(3):
            on_event(Event("progress", rank=rank, phase="prefill", done=layer + 1, total=3))
    for piece in ("The pass", "code is ", "7481."):
        on_event(Event("token", text=piece))
        on_event(Event("progress", phase="decode", done=1, total=request.max_new_tokens))
    timings = {"load_s": 0.1, "tokenize_s": 0.1, "prefill_s": 0.1, "decode_s": 0.1, "total_s": 0.4}
    return [AskResult(request.questions[0], "The passcode is 7481.", "fake", request.method, request.hosts,
                      request.device, 20, 10, 3, 0, 0, timings, 100.0)]

apb_core.ask.run_ask = run_ask
from apb_cli.main import app
sys.argv[0] = "apb"
app()
"""


def _apb_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APB_")}
    return env | {"COLUMNS": "120"} | extra


def _result(request: AskRequest, **fields: Any) -> AskResult:
    base: dict[str, Any] = dict(
        question=request.questions[0], answer="The passcode is 7481.", model="fake", method=request.method,
        hosts=request.hosts, device=request.device, prompt_tokens=120, context_tokens=100, generated_tokens=5,
        anchor_len=0, passing_len=0,
        timings={"load_s": 0.5, "tokenize_s": 0.01, "prefill_s": 0.2, "decode_s": 0.1, "total_s": 0.9},
        prefill_tokens_per_s=500.0, host_stats=[HostStats(0, 100, 0, 0, 0.2)], method_requested=request.method,
    )
    return AskResult(**(base | fields))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """run_ask replaced: `state["fields"]` overrides the result's fields, `state["events"]` are emitted first."""
    import apb_core.ask

    state: dict[str, Any] = {"fields": {}, "events": [], "requests": []}

    def run_ask(request: AskRequest, on_event: Callable[[Event], None] | None = None) -> list[AskResult]:
        state["requests"].append(request)
        for event in state["events"]:
            on_event(event)
        on_event(Event("token", text="The passcode is 7481."))
        return [_result(request, **state["fields"])]

    monkeypatch.setattr(apb_core.ask, "run_ask", run_ask)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    return state


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text("The secret passcode for the north archive is 7481. The river bends twice.\n")
    return path


# -- 1. the first run's conversion: apb's own line, no third-party bars, its own timing -----------------------
def test_conversion_is_one_line_of_apbs_own_and_timed_apart(fake: dict[str, Any], doc: Path) -> None:
    fake["events"] = [Event("phase", phase="convert", text="converting the model once into /c/models/ab (about 20 s)")]
    fake["fields"] = {"timings": {"convert_s": 21.6, "load_s": 0.5, "tokenize_s": 0.4, "prefill_s": 0.2,
                                  "decode_s": 0.1, "total_s": 23.0}}
    result = runner.invoke(app, ["ask", str(doc), QUESTION, "--json"])
    assert result.exit_code == 0, result.stderr
    assert "apb: converting the model once into /c/models/ab (about 20 s)" in result.stderr
    assert "convert" in result.stderr.split("Timings", 1)[1]  # a row of its own in the table
    payload = json.loads(result.stdout)
    assert payload["timings"]["convert_s"] == 21.6 and payload["timings"]["tokenize_s"] == 0.4
    quiet = runner.invoke(app, ["ask", str(doc), QUESTION, "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_prepare_announces_and_times_only_a_real_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apb_core import models

    monkeypatch.setenv("APB_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(2**20))
    source = models.ModelSource(kind="gguf", path=gguf, name="m")
    said: list[str] = []

    def convert(path: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")

    seconds = models.prepare(source, said.append, convert=convert)
    assert seconds > 0 and len(said) == 1
    assert said[0].startswith(f"converting the model once into {tmp_path / 'cache' / 'models'}")
    assert "(about 5 s" in said[0]
    assert models.prepare(source, said.append, convert=convert) == 0.0 and len(said) == 1  # cached: silent
    assert models.cache_size(tmp_path / "cache") > 0


def test_readme_first_command_on_an_empty_cache(tmp_path: Path) -> None:
    """A fresh machine: nothing cached. --quiet means nothing on stderr (no conversion bars), and the sample's
    answer comes out; the conversion has its own timing."""
    env = _apb_env(XDG_CACHE_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-m", "apb_cli.main", "ask", str(SAMPLE), QUESTION, "--quiet", "--json",
                           "--max-new-tokens", "24"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    payload = json.loads(done.stdout)
    assert "7481" in payload["answer"]
    assert payload["timings"]["convert_s"] > 1.0 and payload["timings"]["tokenize_s"] < payload["timings"]["convert_s"]
    assert list((tmp_path / "xdg" / "apb" / "models").glob("*/model.safetensors"))


# -- 2. `> log 2>&1`: the answer keeps its own line -------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--hosts", "2"]])
def test_answer_is_its_own_line_when_stdout_and_stderr_share_a_file(tmp_path: Path, doc: Path,
                                                                   extra: list[str]) -> None:
    log = tmp_path / "log"
    with log.open("w") as fh:
        done = subprocess.run([sys.executable, "-c", FAKE_APB, "ask", str(doc), QUESTION, "--device", "cpu", *extra],
                              stdout=fh, stderr=subprocess.STDOUT, env=_apb_env(), timeout=120)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "The passcode is 7481." in text.splitlines(), text


def test_stderr_line_during_an_answer_starts_on_a_new_line() -> None:
    import io

    from rich.console import Console

    from apb_cli.render import Renderer

    shared = io.StringIO()
    renderer = Renderer(questions=["q"], stream_answers=True, quiet=False,
                        console=Console(file=shared, width=200), out=shared)
    renderer.handle(Event("token", text="The passcode"))
    renderer.handle(Event("log", rank=1, text="hello"))
    renderer.handle(Event("token", text=" is 7481."))
    renderer.close()
    assert shared.getvalue().splitlines()[:2] == ["The passcode", "host 1: hello"]


# -- 3. bench on CPU: a CPU-sized default shape, out-of-memory said, a CPU table ------------------------------
def test_bench_defaults_to_a_cpu_sized_shape_on_cpu() -> None:
    from apb_core import models

    opts = options.BenchOptions(lengths=(2048,), hosts=None, methods=("apb",), preset=None, model=None, repeat=1,
                                device="cpu", json_output=False, plot=None, decode_tokens=1, breakdown=(), seed=0,
                                threads=None, dtype="auto", quiet=True)
    assert opts.preset == "smollm2-135m"
    assert any("smollm2-135m" in note for note in opts.notes)
    shape = models.build_config("smollm2-135m")
    embedded = models.load_config(models.resolve_model(None))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert getattr(shape, key) == getattr(embedded, key), key


def test_bench_on_cpu_says_hosts_gflops_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["bench", "--preset", "tiny", "--len", "64", "--methods", "single,apb", "--repeat",
                                 "1", "--decode-tokens", "2", "--breakdown", "none", "--device", "cpu", "--json"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.stderr
    header = next(line for line in result.stderr.splitlines() if "prefill s" in line)
    assert "hosts" in header and "GPUs" not in header and "GFLOP/s" in header and "TFLOP" not in header
    assert "n/a" in result.stderr and "peak resident memory" in result.stderr
    payload = json.loads(result.stdout)
    assert payload["machine"]["peak_rss_gib"] > 0.05


@pytest.mark.parametrize("code, words", [(-9, "probably out of memory"), (OOM_EXIT_CODE, "out of memory")])
def test_worker_killed_for_memory_is_said(code: int, words: str) -> None:
    from apb_core.dist.launcher import Workers

    workers = Workers.__new__(Workers)
    workers.procs, workers.timeout_s, workers.per_worker = [types.SimpleNamespace(exitcode=code)], 60.0, 1
    message = str(workers._died(0))
    assert message.startswith("worker 0 died") and words in message


def test_cpu_allocator_failure_is_out_of_memory() -> None:
    from apb_core.dist.failures import is_oom

    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert is_oom(MemoryError()) and not is_oom(ValueError("bad"))


# -- 4. a closed pipe ends the run quietly --------------------------------------------------------------------
def test_bench_into_a_closed_pipe_exits_quietly() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "apb_cli.main", "bench", "--preset", "tiny", "--len", "64",
                             "--methods", "single", "--repeat", "1", "--decode-tokens", "2", "--device", "cpu",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_apb_env())
    proc.stdout.close()  # `| head -c 10` that has already gone
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "error" not in err and "Traceback" not in err and "BrokenPipe" not in err


# -- 5. hosts beyond the cores ----------------------------------------------------------------------------------
def test_more_cpu_hosts_than_cores_is_a_warning(fake: dict[str, Any], doc: Path) -> None:
    result = runner.invoke(app, ["ask", str(doc), QUESTION, "--hosts", "64", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    assert "apb: warning: 64 hosts on 2 CPU core(s)" in " ".join(result.stderr.split())
    assert json.loads(result.stdout)["warnings"][0].startswith("64 hosts on 2 CPU core(s)")
    quiet = runner.invoke(app, ["ask", str(doc), QUESTION, "--hosts", "2", "--device", "cpu", "--json"])
    assert json.loads(quiet.stdout)["warnings"] == []


# -- 6. apb asked, full ran on one host: said ---------------------------------------------------------------
def test_one_host_default_is_said(fake: dict[str, Any], doc: Path) -> None:
    fake["fields"] = {"method": "full", "method_requested": "apb"}
    result = runner.invoke(app, ["ask", str(doc), QUESTION, "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    stderr = " ".join(result.stderr.split())
    assert "apb: note: 1 host: this machine has 2 CPU core(s)" in stderr
    assert "full on 1 host(s) (asked --method apb;" in stderr
    payload = json.loads(result.stdout)
    assert payload["method"] == "full" and payload["method_requested"] == "apb"
    assert payload["notes"] and payload["notes"][0].startswith("1 host")
    given = runner.invoke(app, ["ask", str(doc), QUESTION, "--json", "--device", "cpu", "--hosts", "1"])
    assert json.loads(given.stdout)["notes"] == []  # the user chose it: nothing to explain


# -- 7. an answer cut by --max-new-tokens ---------------------------------------------------------------------
def test_length_finish_is_said(fake: dict[str, Any], doc: Path) -> None:
    fake["fields"] = {"finish_reason": "length"}
    result = runner.invoke(app, ["ask", str(doc), QUESTION, "--json", "--max-new-tokens", "5"])
    assert json.loads(result.stdout)["finish_reason"] == "length"
    assert "stopped at --max-new-tokens 5" in " ".join(result.stderr.split())
    fake["fields"] = {"finish_reason": "stop"}
    result = runner.invoke(app, ["ask", str(doc), QUESTION, "--json"])
    assert json.loads(result.stdout)["finish_reason"] == "stop" and "max-new-tokens" not in result.stderr


def test_real_engine_reports_finish_method_and_system(doc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded model through the CLI: finish_reason, method_requested and a system prompt reach the JSON."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    result = runner.invoke(app, ["ask", str(doc), QUESTION, "--json", "--device", "cpu", "--max-new-tokens", "2",
                                 "-s", "You answer with digits only."])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["finish_reason"] == "length" and payload["generated_tokens"] == 2
    assert payload["method_requested"] == "apb" and payload["method"] == "full" and payload["hosts"] == 1


# -- 8. --truncate says how much was kept -----------------------------------------------------------------------
def test_truncation_says_how_much(fake: dict[str, Any], doc: Path) -> None:
    fake["fields"] = {"truncated": True, "dropped_tokens": 78_498, "context_tokens": 8_112}
    result = runner.invoke(app, ["ask", str(doc), QUESTION, "--json", "--truncate", "middle"])
    assert json.loads(result.stdout)["dropped_tokens"] == 78_498
    assert "78,498 tokens dropped, 8,112 context tokens kept" in " ".join(result.stderr.split())


def test_build_prompt_counts_the_dropped_tokens() -> None:
    from apb_core import models
    from apb_core.runtime.prompt import build_prompt

    tokenizer = models.load_tokenizer(models.resolve_model(None))
    document = "The river bends twice before it reaches the old mill. " * 400
    whole = build_prompt(tokenizer, document, QUESTION, window=100_000, reserve=16)
    cut = build_prompt(tokenizer, document, QUESTION, window=2048, reserve=16, truncate="middle")
    assert whole.dropped_tokens == 0 and cut.truncated
    assert cut.dropped_tokens == whole.context_len - cut.context_len > 0


# -- 9. help, version, completion, -m, -s ------------------------------------------------------------------------
def test_short_help_version_and_completion() -> None:
    for args in (["-h"], ["ask", "-h"], ["bench", "-h"], ["eval", "-h"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.stdout, (args, result.stderr)
        assert "<bool>" not in result.stdout
        assert "Examples" in result.stdout
    assert "--install-completion" in runner.invoke(app, ["--help"]).stdout
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("apb ")
    completion = subprocess.run([sys.executable, "-m", "apb_cli.main", "--show-completion", "bash"],
                                capture_output=True, text=True, env=_apb_env(), timeout=60)
    assert completion.returncode == 0 and "complete" in completion.stdout


def test_eval_help_lists_the_tasks() -> None:
    from apb_core.eval.tasks import TASKS

    text = "".join(runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "400"}).stdout.split())
    for task in TASKS:
        assert task in text


def test_short_model_and_system_options(fake: dict[str, Any], doc: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"")
    (model / "config.json").write_text("{}")
    result = runner.invoke(app, ["ask", str(doc), QUESTION, "-m", str(model), "-s", "Be brief."])
    assert result.exit_code == 0, result.stderr
    assert fake["requests"][-1].model == str(model) and fake["requests"][-1].system == "Be brief."
    blank = runner.invoke(app, ["ask", str(doc), QUESTION, "-s", "  "])
    assert blank.exit_code == 2 and "--system" in blank.stderr


def test_system_prompt_sits_before_the_anchor_insert_point() -> None:
    from apb_core import models
    from apb_core.runtime.prompt import build_prompt

    tokenizer = models.load_tokenizer(models.resolve_model(None))
    plain = build_prompt(tokenizer, "Some document.", QUESTION, window=8192, reserve=8)
    system = build_prompt(tokenizer, "Some document.", QUESTION, window=8192, reserve=8,
                          system="You are a terse archivist.")
    head = tokenizer.decode(system.context_ids[: system.insert_at])
    assert "You are a terse archivist." in head and "terse" not in tokenizer.decode(plain.context_ids)
    assert tokenizer.decode(system.context_ids[system.insert_at :]).strip().startswith("Some document.")


# -- 10. apb info: the cache, the window, the defaults ------------------------------------------------------------
def test_info_shows_cache_window_and_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("APB_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "blob").write_bytes(bytes(1000))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    payload = json.loads(runner.invoke(app, ["info", "--json"]).stdout)
    assert payload["cache_dir"] == str(tmp_path / "cache") and payload["cache_bytes"] >= 1000
    assert payload["default_model_window"] == 8192
    assert payload["default_hosts"] == 1 and payload["default_device"] == "cpu"
    text = runner.invoke(app, ["info"], env={"COLUMNS": "200"}).stdout
    assert "cache" in text and "APB_CACHE_DIR" in text and "8192" in text
