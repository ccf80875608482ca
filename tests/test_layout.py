"""Layout: blocks, anchor with the question at the start of the user turn, positions, default lengths."""

import pytest
import torch

from apb_core.algorithm.layout import build_anchor, default_lengths, plan_hosts, split_blocks


@pytest.mark.parametrize("n,hosts", [(10, 3), (7, 7), (1001, 4), (128 * 1024 + 5, 8)])
def test_blocks_cover_context_without_padding(n, hosts):
    blocks = split_blocks(n, hosts)
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    sizes = [e - s for s, e in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_default_lengths_follow_the_paper_table():
    assert default_lengths(128 * 1024, 8) == (4096, 2048)
    assert default_lengths(32 * 1024, 8) == (1024, 512)
    assert default_lengths(128 * 1024, 2) == (8192, 8192)
    assert default_lengths(512 * 1024, 8) == (8192, 8192)
    assert default_lengths(5000, 1) == (0, 0)


def test_anchor_holds_question_after_template_head():
    ctx = list(range(100, 140))
    anchor = build_anchor(ctx, anchor_len=12, question_ids=[1, 2, 3], insert_at=4)
    assert anchor == ctx[:4] + [1, 2, 3] + ctx[4:9]
    assert len(anchor) == 12
    # too short to hold head + question: grows to hold them
    assert build_anchor(ctx, 5, [1, 2, 3], 4) == ctx[:4] + [1, 2, 3]
    assert build_anchor(ctx, 0, [1, 2, 3], 4) == []


def test_host_plans_positions_and_probe():
    ctx = list(range(1000, 1050))
    plans = plan_hosts(ctx, 3, anchor_len=8, question_ids=[7, 8], insert_at=2, question_in_anchor=True,
                       probe_ids=[5, 6, 7], probe_start=50)
    assert [p.anchor_len for p in plans] == [0, 8, 8]
    assert [p.probe_len for p in plans] == [3, 3, 0]  # nobody receives the last host's passing block
    p1 = plans[1]
    ids, pos = p1.input_ids(ctx)[0], p1.position_ids()[0]
    assert ids[:8].tolist() == ctx[:2] + [7, 8] + ctx[2:6]
    assert pos[:8].tolist() == list(range(8))
    assert ids[8 : 8 + p1.block_len].tolist() == ctx[p1.block_start : p1.block_end]
    assert pos[8 : 8 + p1.block_len].tolist() == list(range(p1.block_start, p1.block_end))
    assert pos[-3:].tolist() == [50, 51, 52] and ids[-3:].tolist() == [5, 6, 7]
    assert isinstance(pos, torch.Tensor)


def test_probe_of_several_questions_starts_each_at_the_query_phase():
    ctx = list(range(100, 140))
    plans = plan_hosts(ctx, 2, 6, [1, 2, 3, 4], 2, True, [7, 8, 9, 5, 6], 40, probe_lens=(3, 2))
    assert plans[1].anchor_ids[:6] == [100, 101, 1, 2, 3, 4]
    assert plans[0].probe_segments == (3, 2) and plans[1].probe_segments == ()  # the last host has no probe
    pos = plans[0].position_ids()[0].tolist()
    assert pos[plans[0].block_len:] == [40, 41, 42, 40, 41]
    with pytest.raises(ValueError):
        plan_hosts(ctx, 2, 6, [], 2, False, [7, 8], 40, probe_lens=(3,))
