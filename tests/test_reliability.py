"""Failures end `apb ask` cleanly: a worker that raises, exits, is killed, hangs or runs out of memory in any
phase, and SIGINT/SIGTERM/SIGKILL sent to `apb` in any phase, leave no process behind, one stderr line and the
documented exit code, within a bounded time.

Every case runs the real CLI (`python -m apb_cli.main ask`) as a subprocess on the tiny random llama with the
embedded model's tokenizer (conftest's `tiny_model_dir`), with 2 gloo workers and an injected fault
(`apb_core.dist.faults`, APB_FAULT). Each run is tagged with an environment variable; its processes are found
by scanning /proc/*/environ (conftest's `tagged`), so a worker that outlives `apb` (an orphan) is caught
whatever its parent became. The fault hook's marker files tell a test which phase a run has reached. Run with
-s to see the table of measured times to a clean exit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import save_tiny_model, tagged
from typer.testing import CliRunner

from apb_cli.main import app

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc for leftover processes")

REPO = Path(__file__).resolve().parents[1]
# The same cases on GPUs (workers spawned, NCCL): APB_TEST_DEVICE=cuda; APB_TEST_TOKENIZER=DIR takes the
# tokenizer from DIR where the embedded model is not installed.
DEVICE = os.environ.get("APB_TEST_DEVICE", "cpu")
DEV = r"(?:cpu|cuda:\d)"  # how an error line names a host's device
PHASES = ("load", "prefill", "decode")
HANG_TIMEOUT_S = 4  # APB_COLLECTIVE_TIMEOUT for the runs where a hang must end on its own
GONE_S = 10.0  # every process of a run must be gone this long after apb exits (or is signalled)
FAULT_EXIT_S = 30.0  # a raising/exiting worker must end the run this long after the fault fires
QUESTION = "What does the fox do?"

TIMINGS: list[tuple[str, str, float, float]] = []  # (case, exit code, fault/signal -> apb exit, -> all gone)


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def timing_table():
    yield
    if TIMINGS:
        print("\n\ncase                              exit  to apb exit (s)  to all gone (s)")
        for case, code, to_exit, to_gone in TIMINGS:
            print(f"{case:<33} {code:>4}  {to_exit:>15.2f}  {to_gone:>15.2f}")


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("doc") / "fox.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)  # ~420 tokens
    return path


# -- running apb and watching its processes ----------------------------------------------------------------------
@dataclass
class Run:
    proc: subprocess.Popen
    tag: str
    markers: Path
    err: Path
    out: Path
    exited_at: float = 0.0

    def wait_marker(self, name: str, timeout: float = 60.0) -> float:
        """Wall-clock time at which the run reached `name` (<phase>-<rank>), waiting for it."""
        path = self.markers / name
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"apb exited ({self.proc.returncode}) before {name}: {self.stderr()!r}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {name} marker after {timeout} s")
            time.sleep(0.02)
        return path.stat().st_mtime

    def wait(self, timeout: float) -> int:
        """apb's exit code; the test fails (and the run is killed) if it takes longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"apb still running after {timeout} s: {self.stderr()!r}")
            time.sleep(0.02)
        self.exited_at = time.time()
        return self.proc.returncode

    def wait_gone(self, timeout: float = GONE_S) -> float:
        """Wall-clock time at which no process of the run is left; fails naming any that outlive `timeout`."""
        deadline = time.monotonic() + timeout
        while left := tagged(self.tag):
            if time.monotonic() > deadline:
                cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for p in left]
                for pid in left:
                    os.kill(pid, signal.SIGKILL)
                pytest.fail(f"processes outlived apb by {timeout} s: {cmdlines}")
            time.sleep(0.02)
        return time.time()

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def kill(self) -> None:
        for pid in tagged(self.tag):
            os.kill(pid, signal.SIGKILL)


def start_apb(
    tmp_path: Path,
    model_dir: Path,
    doc: Path,
    *args: str,
    fault: str | None = None,
    collective_timeout: float = HANG_TIMEOUT_S,
    extra_env: dict[str, str] | None = None,
) -> Run:
    tag = uuid.uuid4().hex
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APB_")}
    env.update(
        APB_TEST_RUN=tag,
        APB_FAULT_MARKER=str(markers),
        APB_COLLECTIVE_TIMEOUT=str(collective_timeout),
        OMP_NUM_THREADS="1",
    )
    if fault:
        env["APB_FAULT"] = fault
    env.update(extra_env or {})
    err, out = tmp_path / "stderr", tmp_path / "stdout"
    cmd = [
        sys.executable,
        "-m",
        "apb_cli.main",
        "ask",
        str(doc),
        QUESTION,
        "--model",
        str(model_dir),
        "--device",
        DEVICE,
        "--hosts",
        "2",
        "--threads",
        "1",
        "--max-new-tokens",
        "4",
        "--quiet",
        *args,
    ]
    with open(err, "wb") as e, open(out, "wb") as o:
        # its own process group: a SIGINT to the group is what Ctrl-C in a terminal does, and nothing of
        # ours is in it
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=o, stderr=e, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_default_signals,
        )
    return Run(proc, tag, markers, err, out)


def _default_signals() -> None:
    """apb as a terminal starts it: Ctrl-C and `kill` at their default actions, no signal blocked. An ignored
    or blocked SIGINT is inherited through exec, and a program rightly keeps it ignored (nohup, `cmd &`); the
    full suite's earlier tests must not be able to leave such a state behind for these runs."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# -- a failing worker ends the run ----------------------------------------------------------------------------------
CAUSES = {
    "raise": r"worker 1 failed: InjectedFault: injected fault: rank 1 raise in {phase}",
    "exit": r"worker 1 died \(exit code 3\)",
    "kill": r"worker 1 died \(killed by signal 9",  # then a hint that the kernel's OOM killer sends SIGKILL
    # over NCCL the waiting worker may instead be aborted by NCCL's own watchdog (SIGABRT)
    "hang": r"(?:worker 1 is stuck|worker 0 died \(killed by signal 6: aborted.* worker\(s\) 1 still running\))",
}
FAULTS = [(kind, phase) for kind in ("raise", "exit", "hang") for phase in PHASES] + [("kill", "decode")]


@pytest.mark.parametrize("kind,phase", FAULTS, ids=[f"{k}-{p}" for k, p in FAULTS])
def test_worker_fault_ends_every_process_with_one_line(kind, phase, tmp_path, tiny_model_dir, doc):
    run = start_apb(tmp_path, tiny_model_dir, doc, fault=f"rank=1,phase={phase},kind={kind}")
    code = run.wait(timeout=90.0)
    fired = (run.markers / f"{phase}-1").stat().st_mtime
    gone = run.wait_gone()
    line = one_line(run.stderr())
    assert code == 1, line
    assert re.fullmatch(r"apb: error: " + CAUSES[kind].format(phase=phase) + r".*", line), line
    to_exit = run.exited_at - fired
    TIMINGS.append((f"{kind} in {phase} (rank 1)", str(code), to_exit, gone - fired))
    limit = HANG_TIMEOUT_S + 10.0 if kind == "hang" else FAULT_EXIT_S
    assert to_exit < limit, f"{to_exit:.1f} s from the fault to apb's exit"


@pytest.mark.parametrize("kind,phase,cause", [
    ("raise", "decode", r"worker 1 failed: InjectedFault: injected fault: rank 1 raise in decode"),
    ("hang", "prefill", r"worker 1 failed: HostStuck: host 1 is stuck: host 0 waited \S+ s for its turn .*"),
    ("exit", "prefill", r"worker process 0 \(hosts 0-1\) died \(exit code 3\)"),  # the host's exit is its process's
])
def test_fault_in_hosts_that_share_a_process(kind, phase, cause, tmp_path, tiny_model_dir, doc):
    """--workers 1: both hosts are threads of one worker; a fault in host 1 still ends the run with one line,
    within the collective timeout for a hang, and leaves no process behind."""
    run = start_apb(tmp_path, tiny_model_dir, doc, "--workers", "1", fault=f"rank=1,phase={phase},kind={kind}")
    code = run.wait(timeout=90.0)
    fired = (run.markers / f"{phase}-1").stat().st_mtime
    run.wait_gone()
    line = one_line(run.stderr())
    assert code == 1, line
    assert re.fullmatch(r"apb: error: " + cause + r".*", line), line
    limit = HANG_TIMEOUT_S + 10.0 if kind == "hang" else FAULT_EXIT_S
    assert run.exited_at - fired < limit


def test_out_of_memory_names_the_hosts_the_length_and_what_fits(tmp_path, tiny_model_dir, doc):
    run = start_apb(tmp_path, tiny_model_dir, doc, fault="rank=*,phase=prefill,kind=oom")
    code = run.wait(timeout=60.0)
    fired = min((run.markers / f"prefill-{r}").stat().st_mtime for r in (0, 1))
    gone = run.wait_gone()
    line = one_line(run.stderr())
    assert code == 1, line
    m = re.fullmatch(
        r"apb: error: worker (\d) failed: out of memory on host \1 of 2 \(" + DEV + r"\) with a (\d+)-token context; "
        r"about (\d+) context tokens would fit on 2 host\(s\), or this document on about (\d+) hosts; "
        r"use more hosts, --truncate, or a shorter document \(host\(s\) (\d) ran out too\)",
        line,
    )
    assert m, line
    context, fits, hosts_needed = int(m.group(2)), int(m.group(3)), int(m.group(4))
    # the injected message: 77.93 GiB in use of which 76.10 + 1.20 held by torch, 2 GiB asked for, 1.25 GiB
    # free; the tiny model's weights and activations are next to nothing: the linear estimate is the smaller
    overhead = 77.93 - 76.10 - 1.20
    assert 400 <= context <= 500 and hosts_needed == 3
    assert abs(fits - context * (77.93 + 1.25 - overhead) / (77.93 + 2 - overhead)) <= 1
    assert {m.group(1), m.group(5)} == {"0", "1"}
    TIMINGS.append(("oom in prefill (both ranks)", str(code), run.exited_at - fired, gone - fired))


def test_out_of_memory_with_one_host_is_the_same_line(tmp_path, tiny_model_dir, doc):
    run = start_apb(tmp_path, tiny_model_dir, doc, "--hosts", "1", fault="rank=0,phase=decode,kind=oom")
    code = run.wait(timeout=60.0)
    fired = (run.markers / "decode-0").stat().st_mtime
    gone = run.wait_gone()
    line = one_line(run.stderr())
    assert code == 1, line
    assert re.fullmatch(
        r"apb: error: out of memory on host 0 of 1 \(" + DEV + r"\) with a \d+-token context; about "
        r"\d+ context tokens would fit on 1 host\(s\), or this document on about 2 hosts; .*",
        line,
    )
    TIMINGS.append(("oom in decode (--hosts 1)", str(code), run.exited_at - fired, gone - fired))


# -- signals -------------------------------------------------------------------------------------------------------
SIGNALS = [(sig, phase) for sig in ("SIGINT", "SIGTERM") for phase in PHASES]


@pytest.mark.parametrize("sig,phase", SIGNALS, ids=[f"{s}-{p}" for s, p in SIGNALS])
def test_signal_stops_every_worker(sig, phase, tmp_path, tiny_model_dir, doc):
    """Worker 1 hangs in `phase` (worker 0 waits for it: in a collective in prefill and decode), so the run is
    certainly in that phase when the signal comes. SIGINT goes to the whole process group, as Ctrl-C in a
    terminal does; SIGTERM to apb alone, as `kill PID` does. The collective timeout is long: only the signal
    can end the run."""
    run = start_apb(tmp_path, tiny_model_dir, doc, fault=f"rank=1,phase={phase},kind=hang", collective_timeout=120)
    run.wait_marker(f"{phase}-1")
    if phase != "load":
        run.wait_marker(f"{phase}-0")
    time.sleep(0.3)  # worker 0 is now inside the collective it waits in
    sent = time.time()
    if sig == "SIGINT":
        os.killpg(run.proc.pid, signal.SIGINT)
    else:
        run.proc.send_signal(signal.SIGTERM)
    code = run.wait(timeout=GONE_S)
    gone = run.wait_gone()
    expected = {"SIGINT": (130, "apb: interrupted"), "SIGTERM": (143, "apb: terminated")}[sig]
    assert (code, one_line(run.stderr())) == expected
    assert gone - sent < GONE_S
    TIMINGS.append((f"{sig} in {phase}", str(code), run.exited_at - sent, gone - sent))


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_workers_die_with_a_killed_apb(start_method, tmp_path, tiny_model_dir, doc):
    """SIGKILL leaves apb no chance to stop its workers: they notice their parent is gone by themselves (under
    forkserver their parent is the fork server, which ends with apb)."""
    run = start_apb(tmp_path, tiny_model_dir, doc, fault="rank=1,phase=prefill,kind=hang", collective_timeout=120,
                    extra_env={"APB_START_METHOD": start_method})
    run.wait_marker("prefill-1")
    run.wait_marker("prefill-0")
    time.sleep(0.3)
    sent = time.time()
    run.proc.send_signal(signal.SIGKILL)
    code = run.wait(timeout=GONE_S)
    gone = run.wait_gone(timeout=5.0)
    assert code == -signal.SIGKILL
    TIMINGS.append((f"SIGKILL apb in prefill ({start_method})", str(code), run.exited_at - sent, gone - sent))


def test_stuck_worker_writes_its_stack_under_debug(tmp_path, tiny_model_dir, doc):
    """APB_DEBUG=1: before the launcher ends a stuck worker, the worker writes every thread's Python stack to
    stderr, which shows where it hangs (here: the injected hang's sleep in apb_core/dist/faults.py)."""
    run = start_apb(tmp_path, tiny_model_dir, doc, fault="rank=1,phase=prefill,kind=hang",
                    extra_env={"APB_DEBUG": "1"})
    code = run.wait(timeout=90.0)
    run.wait_gone()
    err = run.stderr()
    assert code == 1
    assert "apb: error: worker 1 is stuck" in err, err
    assert "Current thread" in err and "most recent call first" in err, err
    assert re.search(r'File ".*apb_core/dist/faults\.py", line \d+ in fire', err), err


# -- absurd numbers reach the real engine ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,code,words",
    [
        (("--hosts", "1000000"), 2, "--hosts must be at most"),
        (("--anchor-len", "1000000000", "--passing-len", "1000000000"), 0, ""),
    ],
    ids=["hosts-1e6", "anchor-and-passing-1e9"],
)
def test_absurd_numbers_with_the_real_engine(args, code, words, tmp_path, tiny_model_dir, doc):
    run = start_apb(tmp_path, tiny_model_dir, doc, *args)
    assert run.wait(timeout=60.0) == code, run.stderr()
    run.wait_gone()
    if code:
        assert words in one_line(run.stderr())
    else:
        assert run.stderr() == ""


# -- model loading -----------------------------------------------------------------------------------------------------
runner = CliRunner()


@pytest.fixture(scope="module")
def pickle_dir(tmp_path_factory, embedded_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-pickle")
    save_tiny_model(folder, embedded_tokenizer, pickle=True)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    return folder


def _cli_error(*args: str) -> str:
    result = runner.invoke(app, ["ask", *args])
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    return one_line(result.stderr)


def test_pickle_checkpoints_are_refused_without_allow_pickle(pickle_dir, doc, tmp_path):
    line = _cli_error(str(doc), QUESTION, "--model", str(pickle_dir), "--device", "cpu")
    assert line.startswith("apb: error: refusing") and "--allow-pickle" in line
    lone = tmp_path / "model.pt"
    lone.write_bytes((pickle_dir / "pytorch_model.bin").read_bytes())
    line = _cli_error(str(doc), QUESTION, "--model", str(lone), "--device", "cpu")
    assert "refusing pickle checkpoint" in line


def test_pickle_checkpoints_load_with_allow_pickle(tmp_path, pickle_dir, doc):
    run = start_apb(tmp_path, pickle_dir, doc, "--allow-pickle")
    assert run.wait(timeout=60.0) == 0, run.stderr()
    run.wait_gone()
    assert run.out.read_text(errors="replace").endswith("\n")


@pytest.mark.parametrize(
    "config,words",
    [
        ({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4}, "unsupported model type 'gpt2'"),
        ({"num_key_value_heads": 3}, "not a multiple of its 3 kv heads"),
    ],
    ids=["gpt2", "kv-heads"],
)
def test_unsupported_config_is_one_clear_error(config, words, tmp_path, tiny_model_dir, doc):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    base = json.loads((folder / "config.json").read_text())
    base.update(config)
    (folder / "config.json").write_text(json.dumps(base))
    line = _cli_error(str(doc), QUESTION, "--model", str(folder), "--device", "cpu", "--hosts", "2")
    assert words in line, line
