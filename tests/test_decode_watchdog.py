"""The launcher's decode watchdog (apb_core.dist.launcher.Workers._check_decode): once rank 0 has reported an
answer token, no next token for the collective timeout plus DECODE_GRACE_S ends the run with one WorkerError,
whatever the workers do (over NCCL a rank waiting for a stuck one blocks on the GPU, where no timeout of its own
ends it promptly). No worker processes: the events arrive on a queue as the workers would send them."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import pytest

from apb_core.api import Event
from apb_core.dist.env import read_env
from apb_core.dist.launcher import DECODE_GRACE_S, Workers
from apb_core.dist.worker import WorkerSpec
from apb_core.errors import WorkerError

TIMEOUT_S = 0.5


def _workers(events: list[tuple]) -> Workers:
    env = dataclasses.replace(read_env({}), collective_timeout_s=TIMEOUT_S)
    workers = Workers(WorkerSpec(env=env), hosts=2)
    workers.events = queue.Queue()
    for item in events:
        workers.events.put(item)
    return workers


@pytest.mark.parametrize("done", [(0,), (0, 1, 2)], ids=["stuck-in-query-phase", "stuck-after-two-tokens"])
def test_no_next_token_ends_the_run_after_the_timeout(done):
    """Rank 0 reports token 0 when an answer starts (the query phase follows), then every token."""
    tokens = [("event", Event("progress", rank=0, phase="decode", done=i, total=8)) for i in done]
    workers = _workers(tokens)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="stuck: no answer token for 2.5 s in decode"):
        workers._collect("result")
    took = time.monotonic() - t0
    assert TIMEOUT_S + DECODE_GRACE_S <= took < TIMEOUT_S + DECODE_GRACE_S + 1.0


def test_before_the_first_token_the_decode_watchdog_waits():
    """Prefill and loading have their own watchdogs: without a token the decode one never fires, and results
    that arrive end the wait normally."""
    workers = _workers([("event", Event("progress", rank=0, phase="prefill", done=1, total=2))])

    def finish():
        time.sleep(TIMEOUT_S + DECODE_GRACE_S + 0.5)
        workers.events.put(("result", 0, b"a"))
        workers.events.put(("result", 1, b"b"))

    threading.Thread(target=finish, daemon=True).start()
    assert workers._collect("result") == {0: b"a", 1: b"b"}
