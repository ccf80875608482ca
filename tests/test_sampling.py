"""Sampling and stop strings: greedy, top-p nucleus, seeded reproducibility, no partial stop string streamed."""

import torch

from apb_core.runtime.sampling import StopText, sample_next


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_next(logits, 0.0, 1.0, None) == 1


def test_top_p_keeps_only_the_nucleus_and_seed_reproduces():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    seen = {sample_next(logits, 1.0, 0.85, torch.Generator().manual_seed(s)) for s in range(200)}
    assert seen == {0, 1}  # 0.6 + 0.3 reaches 0.85: tokens 2 and 3 are cut
    a = [sample_next(logits, 0.8, 1.0, torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [sample_next(logits, 0.8, 1.0, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b


def test_stop_text_never_streams_a_partial_stop_string():
    stop = StopText(["\nQuestion:"])
    shown = stop.update("The answer is 42.")
    shown += stop.update("The answer is 42.\nQue")  # could become the stop string: held back
    assert shown == "The answer is 42."
    shown += stop.update("The answer is 42.\nQuestion: next")
    assert stop.stopped and stop.text == "The answer is 42."
    assert shown + stop.flush() == "The answer is 42."


def test_stop_text_releases_held_back_text_when_it_diverges():
    stop = StopText(["STOP"])
    out = stop.update("abc ST")
    out += stop.update("abc STAR")
    assert not stop.stopped and out + stop.flush() == "abc STAR"
