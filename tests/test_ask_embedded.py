"""The embedded model (SmolLM2-135M-Instruct GGUF) through run_ask: H = 2 APB answers a planted fact."""

import random
from dataclasses import replace

import pytest

from apb_core.api import AskRequest
from apb_core.ask import Session, run_ask
from apb_core.errors import InputError

SENTENCES = [
    "The river bends twice before it reaches the old mill.",
    "Farmers in the valley grow barley, beans and a little rye.",
    "In winter the road over the pass is closed for weeks.",
    "The library keeps its maps in long flat drawers.",
    "A bell in the square rings every hour from dawn to dusk.",
    "Travellers often stop at the inn for bread and soup.",
    "The school was rebuilt after the flood of the spring.",
    "Sheep graze on the high meadows during the summer months.",
]
FACT = "The secret passcode for the north archive is 7481."
QUESTION = "What is the secret passcode for the north archive?"


def haystack(sentences: int, depth: float = 0.45, seed: int = 0) -> str:
    rng = random.Random(seed)
    body = [rng.choice(SENTENCES) for _ in range(sentences)]
    body.insert(int(len(body) * depth), FACT)
    return " ".join(body)


@pytest.fixture(scope="module")
def document() -> str:
    return haystack(270)  # about 3K tokens with the SmolLM2 tokenizer


def test_apb_two_hosts_answers_planted_fact(document):
    """Compressed APB (auto-exact off) finds the fact; the default at this size is the exact layout."""
    request = AskRequest(document=document, questions=[QUESTION], hosts=2, method="apb", max_new_tokens=24)
    with Session(request) as session:
        result = session.answer(document, QUESTION, settings=replace(request, auto_exact=False))
        assert 2500 <= result.context_tokens <= 3600
        assert "7481" in result.answer
        assert result.hosts == 2 and result.method == "apb" and not result.auto_exact
        assert result.anchor_len > 0 and result.passing_len > 0
        assert [h.passing_tokens for h in result.host_stats] == [0, result.passing_len]

        default = session.answer(document, QUESTION)
        assert default.auto_exact and default.anchor_len == 0 and default.passing_len == "all"
        assert "7481" in default.answer


def test_prompt_longer_than_window_is_one_clear_error():
    long_doc = haystack(1200)
    with pytest.raises(InputError) as err:
        run_ask(AskRequest(document=long_doc, questions=[QUESTION], hosts=1, max_new_tokens=8))
    message = str(err.value)
    assert "8192" in message and "--truncate" in message


@pytest.mark.parametrize("mode", ["middle", "end"])
def test_truncate_fits_the_window_and_keeps_the_right_part(mode):
    from apb_core import models
    from apb_core.runtime.prompt import build_prompt

    tokenizer = models.load_tokenizer(models.resolve_model(None))
    long_doc = haystack(1200) + " The final sentence is here."
    prompt = build_prompt(tokenizer, long_doc, QUESTION, window=8192, reserve=16, truncate=mode)
    assert prompt.truncated and prompt.total_len + 16 == 8192
    tail = tokenizer.decode(prompt.context_ids[-8:])
    assert ("final sentence" in tail) == (mode == "middle")


def test_cite_points_at_the_planted_fact(document):
    """--cite over two hosts: the top citation is the passage of the planted fact (the document is one line)."""
    request = AskRequest(document=document, questions=[QUESTION], hosts=2, method="full", max_new_tokens=16,
                         cite=True)
    with Session(request) as session:
        result = session.answer(document, QUESTION)
    assert "7481" in result.answer
    top = result.citations[0]
    assert FACT in top.text and (top.line_start, top.line_end, top.page) == (1, 1, None)
    assert 0 < top.score <= 1 and len(result.citations) == 3
    assert [c.score for c in result.citations] == sorted((c.score for c in result.citations), reverse=True)


def test_apb_compressed_answers_a_needle_in_a_middle_host():
    """Three hosts in one process (--workers 1), compression on: the fact sits inside host 1's block (not host
    0's, which is exact for every method), and the answer still has it."""
    document = haystack(270, depth=0.5, seed=1)
    request = AskRequest(document=document, questions=[QUESTION], hosts=3, workers=1, method="apb",
                         max_new_tokens=24, auto_exact=False)
    with Session(request) as session:
        result = session.answer(document, QUESTION)
        doc_tokens = len(session.tokenizer(document, add_special_tokens=False)["input_ids"])
        before = len(session.tokenizer(document[: document.index(FACT)], add_special_tokens=False)["input_ids"])
    blocks = [h.block_tokens for h in result.host_stats]
    needle = result.context_tokens - doc_tokens + before  # the chat template's head comes first
    assert blocks[0] + 0.1 * blocks[1] < needle < blocks[0] + 0.9 * blocks[1], (needle, blocks)
    assert not result.auto_exact and result.workers == 1
    assert 0 < result.passing_len < min(blocks)  # compressed: each host passes a part of its block
    assert [h.passing_tokens > 0 for h in result.host_stats] == [False, True, True]
    assert "7481" in result.answer
