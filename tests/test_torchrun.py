"""The multi-machine path: `apb ask` under two torchrun agents (one host each, gloo over localhost, as on two
machines) answers exactly as `apb ask --hosts 2` does on one machine, and only rank 0 prints.

Both runs use APB with a compressed passing block (auto-exact off), so the anchor and passing blocks really
cross hosts; greedy decoding on the same split makes them bit-for-bit the same computation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import tagged

from apb_core.dist.launcher import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc for leftover processes")

REPO = Path(__file__).resolve().parents[1]
RUN_S = 180.0  # each run, load included, on a busy 2-core machine
# what differs between two runs of the same answer: clocks, and torchrun's rank 0 knows only its own host's stats
UNCOMPARED = ("timings", "prefill_tokens_per_s", "host_stats")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def ask_args(doc: Path, model_dir: Path) -> list[str]:
    return [
        "-m", "apb_cli.main", "ask", str(doc), "What does the fox do?",
        "--model", str(model_dir), "--device", "cpu", "--threads", "1", "--json", "--max-new-tokens", "8",
        "--method", "apb", "--anchor-len", "64", "--passing-len", "32", "--no-auto-exact",
    ]


def finish(procs: list[subprocess.Popen], tag: str, timeout: float) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process; every process of the run (tagged: torchrun starts its
    workers in sessions of their own) is killed if they are not all done within `timeout`, or on any failure."""
    deadline = time.monotonic() + timeout
    try:
        out = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            out.append((proc.returncode, stdout, stderr))
        return out
    finally:
        for pid in tagged(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_torchrun_agents_answer_as_two_local_hosts(tiny_model_dir, tmp_path):
    doc = tmp_path / "fox.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 40)  # ~420 tokens
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APB_", "TORCHELASTIC_")) and k not in TORCHRUN_VARS}
    env.update(APB_TEST_RUN=tag, OMP_NUM_THREADS="1")
    ask = ask_args(doc, tiny_model_dir)

    [(code, stdout, stderr)] = finish([start([*ask, "--hosts", "2"], env)], tag, RUN_S)
    assert code == 0, stderr
    local = json.loads(stdout)

    port = str(free_port())
    agents = [
        start(["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
               "--master-addr", "127.0.0.1", "--master-port", port, "--rdzv-backend", "static",
               "--max-restarts", "0", *ask], env)
        for rank in (0, 1)
    ]
    t0 = time.monotonic()
    (code0, out0, err0), (code1, out1, err1) = finish(agents, tag, RUN_S)
    print(f"\ntorchrun, 2 agents: {time.monotonic() - t0:.1f} s")
    assert (code0, code1) == (0, 0), (err0, err1)

    assert out1 == ""  # rank 1 computes and prints nothing: no answer, no progress, no report
    assert not any(word in err1 for word in ("Timings", "prefill", "decode")), err1
    answer = json.loads(out0)
    assert answer["hosts"] == 2 and answer["generated_tokens"] > 0 and answer["answer"]
    assert {k: v for k, v in answer.items() if k not in UNCOMPARED} == {
        k: v for k, v in local.items() if k not in UNCOMPARED
    }
