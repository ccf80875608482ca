"""Attention mass -> citations (apb_core.citations): passages, pages, the token offsets behind them, the
chat head left out, and the JSON/stderr form; cite_hit (apb_core.eval.scoring)."""

from __future__ import annotations

import torch

from apb_cli.render import citation_dict, citation_place
from apb_core.api import Citation
from apb_core.citations import cite, document_token_starts, passages
from apb_core.eval.scoring import cite_hit
from apb_core.runtime.prompt import build_prompt

DOC = ("Intro line one.\nIntro line two.\n\n--- page 2 ---\n\n"
       + "Filler sentence here. " * 20 + "The code is 7481. " + "More filler follows now. " * 20 + "\nLast line.")


def test_passages_pack_lines_cut_long_lines_and_follow_pages():
    cut = passages(DOC, paged=True)
    assert (cut[0].line_start, cut[0].line_end, cut[0].page) == (1, 2, 1)  # two short lines packed
    assert all(p.page == 2 and p.line_start >= 6 for p in cut[1:])  # after the marker, never spanning it
    assert all(p.end - p.start <= 300 for p in cut)
    joined = "".join(DOC[p.start:p.end] for p in cut[1:])
    assert "The code is 7481." in joined and "--- page" not in joined
    assert passages(DOC)[0].page is None  # text: no pages


def test_mass_on_the_needle_cites_its_passage_and_skips_the_chat_head(embedded_tokenizer):
    prompt = build_prompt(embedded_tokenizer, DOC, "What is the code?", 8192, 16)
    starts = document_token_starts(embedded_tokenizer, DOC, prompt)
    assert starts is not None and len(starts) == prompt.context_len - prompt.insert_at
    mass = torch.full((prompt.context_len,), 0.01)
    mass[: prompt.insert_at] = 100.0  # the chat head (attention sink): never cited
    needle = DOC.index("7481")
    for i, char in enumerate(starts):
        if needle - 2 <= char <= needle + 4:
            mass[prompt.insert_at + i] = 5.0
    cites = cite(embedded_tokenizer, DOC, prompt, mass, paged=True)
    assert len(cites) == 3
    assert "The code is 7481." in cites[0].text and cites[0].page == 2 and cites[0].line_start == 6
    assert cites[0].score > 0.5 and cites[0].score >= cites[1].score >= cites[2].score
    assert cite_hit(cites, ["7481"]) == 1.0 and cite_hit(cites[1:], ["7481"]) == 0.0 and cite_hit([], ["1"]) == 0.0


def test_truncated_document_offsets_line_up(embedded_tokenizer):
    for mode in ("end", "middle"):
        prompt = build_prompt(embedded_tokenizer, DOC, "What?", 200, 16, truncate=mode)
        assert prompt.truncated
        starts = document_token_starts(embedded_tokenizer, DOC, prompt)
        assert starts is not None and len(starts) == prompt.context_len - prompt.insert_at
        assert starts == sorted(starts)


def test_citation_json_and_place():
    text = Citation(line_start=4, line_end=6, text="a b", score=0.25)
    pdf = Citation(line_start=7, line_end=7, text="c", score=0.5, page=3)
    assert citation_dict(text) == {"line_start": 4, "line_end": 6, "text": "a b", "score": 0.25}
    assert citation_dict(pdf)["page"] == 3
    assert citation_place(text) == "lines 4-6" and citation_place(pdf) == "page 3, line 7"
