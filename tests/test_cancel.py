"""Cancelling a job on the hosts (what `apb serve` does when a client goes away): the launcher's cancel flag,
set while a job decodes, ends the decode on every host at the same token with finish_reason "cancelled", over
worker processes (W = H) and over hosts that share a process (W < H); cleared, the next job runs to its end."""

from __future__ import annotations

import pytest

MAX_TOKENS = 4000  # far more than the tokens decoded before the flag, set at CANCEL_AT, reaches the last host
CANCEL_AT = 8


def _job(max_new_tokens: int):
    """A one-question AskJob over 64 random tokens (the tiny preset: no tokenizer, no end-of-sequence id)."""
    from conftest import tokens

    from apb_core.algorithm.methods import resolve_method
    from apb_core.runtime.generate import AskJob
    from apb_core.runtime.prompt import Prompt

    prompt = Prompt(tokens(1, 64), tokens(2, 4), [], [], 0)
    return AskJob(prompt, resolve_method("full", 64, 2), max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("workers", [2, 1], ids=["processes", "shared-process"])
def test_a_set_flag_ends_decode_on_every_host_at_the_same_token(workers):
    from apb_core.dist.launcher import Workers
    from apb_core.dist.worker import WorkerSpec

    armed: list[Workers] = []  # the runner whose flag on_event sets, during the first job only

    def on_event(event) -> None:  # in the launcher, as the server's ticket would: after CANCEL_AT tokens
        if armed and event.kind == "progress" and event.phase == "decode" and event.done >= CANCEL_AT:
            armed[0].cancel.set()

    with Workers(WorkerSpec(preset="tiny", device="cpu", threads=1), 2, on_event, workers=workers) as w:
        w.cancel.clear()
        armed.append(w)
        cancelled = [r[0] for r in w.run(_job(MAX_TOKENS))]
        armed.clear()
        assert [r.finish_reason for r in cancelled] == ["cancelled", "cancelled"]
        assert cancelled[0].token_ids == cancelled[1].token_ids  # the same step on both hosts
        assert CANCEL_AT <= len(cancelled[0].token_ids) < MAX_TOKENS

        w.cancel.set()  # set before the job: every host stops at the first token
        before = [r[0] for r in w.run(_job(16))]
        assert [(r.finish_reason, r.token_ids) for r in before] == [("cancelled", [])] * 2

        w.cancel.clear()  # cleared: the next job runs to its end, and its tokens are the uncancelled ones
        whole = [r[0] for r in w.run(_job(16))]
        assert [r.finish_reason for r in whole] == ["length", "length"]
        assert whole[0].token_ids == whole[1].token_ids
        assert whole[0].token_ids[:CANCEL_AT] == cancelled[0].token_ids[:CANCEL_AT]
