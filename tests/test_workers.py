"""`--workers W`: H hosts in W processes, H/W of them taking turns in each (apb_core.dist.local_hosts).

The claim is "the same math as H processes": the tests compare greedy tokens and the logits after the query
phase (fp32, CPU) of W < H against W = H, for exact and compressed layouts at H = 2, 3, 4, within 1e-4 (the
collectives only copy values, so the runs agree to rounding). Also: failures and timeouts end every host of
the process, and bench's projected prefill follows from its ledger.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import reference, run_hosts, tiny_model, tokens
from engine_workers import AnswerJob, answer, ask_job

from apb_core.dist.faults import NO_FAULTS
from apb_core.dist.local_hosts import LocalHosts, Op, run_in_turn
from apb_core.dist.worker import Host
from apb_core.runtime.engine import HostEngine

LOGITS_TOL = 1e-4
# (method, anchor_len, passing_len[, layout]): exact over H hosts, Star, APB compressed (passing 6 of each block),
# APB compressed with balanced blocks
METHODS = [("full", 0, "all"), ("star", None, None), ("apb", 8, 6), ("apb", 8, 6, "balanced")]


def in_process(hosts: int, job, kind: str = "llama", decode: str = "auto") -> list:
    """`job` on `hosts` hosts that share one model and take turns in this process (W = 1)."""
    model = tiny_model(kind)
    turns = LocalHosts(hosts, 0, hosts, torch.device("cpu"), timeout_s=60.0)
    local = [Host(HostEngine(model, r, hosts, turns.comm(r), decode=decode), None, NO_FAULTS, 0.0)
             for r in range(hosts)]
    return run_in_turn(turns, local, job, lambda e: None)


def assert_same(got: list, want: list) -> None:
    """Per host, per method: the same tokens, logits within LOGITS_TOL, the same passing count."""
    for host_got, host_want in zip(got, want, strict=True):
        for (logits, toks, passing), (logits_w, toks_w, passing_w) in zip(host_got, host_want, strict=True):
            assert toks == toks_w
            assert passing == passing_w
            torch.testing.assert_close(logits, logits_w, atol=LOGITS_TOL, rtol=0)


@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_one_process_equals_one_process_per_host(hosts: int) -> None:
    ctx, query, question = tokens(10 + hosts, 240), tokens(20, 9), tokens(21, 5)
    args = (ctx, query, METHODS, question, 0, question)
    want = run_hosts(answer, hosts, "llama", *args)  # W = H: gloo processes
    got = in_process(hosts, AnswerJob(args))
    assert_same(got, want)
    assert got[-1][2][2] > 0  # compressed APB passed something to the last host (the comparison is not vacuous)
    # and exact over H hosts is the dense one-process answer
    ref_logits, ref_tokens = reference(tiny_model("llama"), ctx, query)
    assert got[0][0][1] == ref_tokens
    torch.testing.assert_close(got[0][0][0], ref_logits, atol=LOGITS_TOL, rtol=0)


def test_static_decode_and_citations_in_one_process() -> None:
    """The static decode step (the CUDA-graph code, run eagerly on CPU) over every local cache at once, two
    questions over one prefill (the cache rewound between them), and --cite's attention mass equal the
    one-process-per-host run."""
    from apb_core.algorithm.methods import resolve_method
    from apb_core.runtime.generate import AskJob
    from apb_core.runtime.prompt import Prompt

    ctx, query = tokens(41, 210), tokens(42, 8)
    method = resolve_method("apb", len(ctx), 3, 8, 6, auto_exact=False)
    job = AskJob(Prompt(ctx, query, query[:4], query[:4], 0), method, max_new_tokens=10, cite=True,
                 query_parts=[query, tokens(43, 6)])
    got = in_process(3, job, decode="static")
    want = run_hosts(ask_job, 3, job)
    assert [[r.token_ids for r in host] for host in got] == [[r.token_ids for r in host] for host in want]
    for question in range(2):
        first, first_want = got[0][question].first_logits, want[0][question].first_logits
        torch.testing.assert_close(first, first_want, atol=LOGITS_TOL, rtol=0)
        mass, mass_want = got[0][question].context_mass, want[0][question].context_mass
        assert mass.shape == (len(ctx),) and mass.sum() > 0
        torch.testing.assert_close(mass, mass_want, atol=1e-5, rtol=1e-4)


def test_two_workers_of_two_hosts_equal_four_workers() -> None:
    """W = 2 for H = 4 through the product's launcher: threads inside each process, gloo between the two."""
    from apb_core.dist.launcher import Workers
    from apb_core.dist.worker import WorkerSpec

    ctx, query = tokens(31, 200), tokens(32, 8)
    job = AnswerJob((ctx, query, METHODS[:3], query[:4], 0, query[:4]))
    spec = WorkerSpec(preset="tiny", device="cpu", threads=1)
    with Workers(spec, 4, start_method="forkserver", workers=2) as workers:
        assert len(workers.procs) == 2
        got = workers.run(job)
    with Workers(spec, 4, start_method="forkserver") as workers:
        want = workers.run(job)
    assert_same(got, want)


class _Failing:
    """A job whose host `bad` raises at its first turn; the others wait in a collective."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def run(self, host, emit):
        if host.engine.rank == self.bad:
            raise ValueError("boom")
        host.engine.comm.barrier()
        return host.engine.rank


def _bare_hosts(hosts: int, timeout_s: float) -> tuple[LocalHosts, list[Host]]:
    class Engine:
        def __init__(self, comm) -> None:
            self.comm, self.rank = comm, comm.rank

    turns = LocalHosts(hosts, 0, hosts, torch.device("cpu"), timeout_s)
    return turns, [Host(Engine(turns.comm(r)), None, NO_FAULTS, 0.0) for r in range(hosts)]


@pytest.mark.parametrize("bad", [0, 2])
def test_a_failing_host_ends_the_others(bad: int) -> None:
    turns, local = _bare_hosts(3, timeout_s=30.0)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="boom") as info:
        run_in_turn(turns, local, _Failing(bad), lambda e: None)
    assert info.value.apb_rank == bad
    assert time.monotonic() - t0 < 5.0  # not the 30 s timeout
    assert not [t for t in threading.enumerate() if t.name.startswith("apb-host-")]
    assert run_in_turn(turns, local, _Failing(-1), lambda e: None) == [0, 1, 2]  # usable again afterwards


def test_a_stuck_host_times_out() -> None:
    class Stuck:
        def run(self, host, emit):
            if host.engine.rank == 1:
                time.sleep(30)  # holds its turn far past the others' timeout, outside any collective
            host.engine.comm.barrier()

    turns, local = _bare_hosts(3, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"host 1 is stuck: host [02] waited 0.5 s for its turn") as info:
        run_in_turn(turns, local, Stuck(), lambda e: None)
    assert info.value.apb_rank == 1
    assert time.monotonic() - t0 < 5.0  # the timeout plus the abort grace, not the stuck host's 30 s


def test_collectives_in_turn() -> None:
    """all_gather stacks in rank order; broadcast copies the source's tensor; hosts run strictly one at a time."""
    running, overlap = [0], [False]

    class Probe:
        def run(self, host, emit):
            comm = host.engine.comm
            running[0] += 1
            overlap[0] |= running[0] > 1
            time.sleep(0.01)
            running[0] -= 1
            gathered = comm.all_gather(torch.full((2,), float(comm.rank)))
            t = torch.tensor([comm.rank * 10])
            comm.broadcast(t, src=2)
            return gathered.tolist(), int(t)

    turns, local = _bare_hosts(4, timeout_s=10.0)
    results = run_in_turn(turns, local, Probe(), lambda e: None)
    assert not overlap[0]
    assert results == [([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], 20)] * 4


def test_projection_arithmetic() -> None:
    from apb_core.bench.projection import project

    gib = 2**30
    ops = [Op("all_gather", gib, [1.0, 3.0, 2.0]), Op("barrier", 0, [0.5, 0.25, 1.0])]
    p = project(ops, link_gibps=2.0)
    assert p.compute_s == 4.0  # 3 + 1: the slowest host of each segment
    assert p.comm_s == 1.0  # (3 - 1) x 1 GiB at 2 GiB/s
    assert p.prefill_s == 5.0
    assert p.host_busy_s == [1.5, 3.25, 3.0]


def test_bench_projects_from_one_process() -> None:
    """`apb bench --hosts 4 --workers 1`: every row has a projected prefill; exact over 4 hosts still equals
    single's logits; the projection is at most the sequential time and at least the busiest host's."""
    from apb_core.bench import BenchConfig, run_bench

    config = BenchConfig(lengths=[320], hosts=4, workers=1, methods=["single", "full", "apb"], preset="tiny",
                         device="cpu", repeat=2, decode_tokens=3, breakdown=[], threads=1)
    report = run_bench(config)
    rows = {row["method"]: row for row in report.rows}
    assert report.config["workers"] == 1 and report.machine["workers"] == 1
    assert rows["full"]["logits_max_abs_diff_vs_single"] < 1e-3
    for name in ("full", "apb"):
        proj = rows[name]["projected"]
        assert len(proj["host_busy_s"]) == 4
        assert max(proj["host_busy_s"]) <= proj["compute_s"] <= rows[name]["prefill_s"] * 1.05
        assert proj["comm_s"] > 0  # both pass KV in prefill
        assert "projected" in proj["note"]


def test_ring_needs_one_process_per_host() -> None:
    from apb_core.bench import BenchConfig, run_bench
    from apb_core.errors import InputError

    with pytest.raises(InputError, match="need one process per host"):
        run_bench(BenchConfig(lengths=[128], hosts=2, workers=1, methods=["ring"], preset="tiny"))



def test_bench_cli_with_fewer_workers_than_hosts() -> None:
    """`apb bench --hosts 4 --workers 1` through the CLI: ring and Ulysses left out with a note (the default
    methods), the projected table on stderr, `projected` in every JSON row."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("APB_")} | {"COLUMNS": "160"}
    proc = subprocess.run(
        [sys.executable, "-m", "apb_cli.main", "bench", "--device", "cpu", "--preset", "tiny", "--len", "256",
         "--hosts", "4", "--workers", "1", "--repeat", "1", "--decode-tokens", "2", "--breakdown", "none", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert [r["method"] for r in payload["rows"]] == ["single", "star", "apb"]
    assert any("ring, ulysses left out" in note for note in payload["notes"])
    assert all(r["projected"]["prefill_s"] > 0 for r in payload["rows"])
    assert "projected prefill on H devices" in proc.stderr and "Traceback" not in proc.stderr
