"""Draft rows: prefill cut into pieces with a sliding window, decode blocks
with a window, full context for short requests, never past the draft's range."""

import pytest
import torch

from vllm_specextend.retrieval.draft_rows import plan_draft_rows


def plan(query_lens, seq_lens, window=8, piece_len=4, draft_max=12):
    qsl = torch.tensor([0] + list(query_lens)).cumsum(0).to(torch.int32)
    table = torch.arange(len(query_lens) * 8, dtype=torch.int32).view(len(query_lens), 8)
    return plan_draft_rows(qsl, torch.tensor(seq_lens, dtype=torch.int32), table,
                           window, piece_len, draft_max)


def keys(rows, row):
    return rows.key_positions[row, : int(rows.num_keys[row])].tolist()


def test_short_request_sees_its_whole_context():
    rows = plan([2], [7])
    assert rows.query_start_loc.tolist() == [0, 2]
    assert keys(rows, 0) == list(range(7))


def test_decode_block_of_long_request_sees_window_then_itself():
    rows = plan([3], [40])  # queries at 37, 38, 39
    assert keys(rows, 0) == list(range(29, 40))  # 8 older + 3 own


def test_long_prefill_is_cut_into_windowed_pieces():
    rows = plan([10, 1], [10, 30])
    assert rows.query_start_loc.tolist() == [0, 4, 8, 10, 11]
    assert keys(rows, 0) == [0, 1, 2, 3]
    assert keys(rows, 1) == list(range(0, 8))
    assert keys(rows, 2) == list(range(0, 10))
    assert keys(rows, 3) == list(range(21, 30))
    # Rows keep their request's block table.
    assert rows.block_tables[:, 0].tolist() == [0, 0, 0, 8]


def test_never_past_the_draft_range():
    torch.manual_seed(0)
    query_lens = torch.randint(1, 40, (16,))
    seq_lens = query_lens + torch.randint(0, 500, (16,))
    rows = plan(query_lens.tolist(), seq_lens.tolist(), window=20, piece_len=7, draft_max=27)
    assert int(rows.num_keys.max()) <= 27
    assert int(rows.query_start_loc[-1]) == int(query_lens.sum())


def test_rejects_window_past_the_draft_range():
    with pytest.raises(ValueError, match="exceed the draft's 12 positions"):
        plan([1], [5], window=10, piece_len=4, draft_max=12)


def test_decode_block_follows_its_working_set():
    qsl = torch.tensor([0, 2, 6], dtype=torch.int32)
    seq_lens = torch.tensor([40, 4], dtype=torch.int32)  # decode block; short prefill
    table = torch.zeros(2, 8, dtype=torch.int32)
    set_positions = torch.tensor([[0, 1, 2, 3, 20, 21, 30, 31], [0] * 8])
    set_counts = torch.tensor([6, 0])
    rows = plan_draft_rows(qsl, seq_lens, table, 8, 4, 12, (set_positions, set_counts))
    assert keys(rows, 0) == [0, 1, 2, 3, 20, 21, 38, 39]  # the set, then its own queries
    assert keys(rows, 1) == [0, 1, 2, 3]  # no set: the window (its whole context)
    assert rows.uses_working_set.tolist() == [True, False]


def test_working_set_refreshed_mid_prefill_falls_back_to_the_window():
    """A refresh during chunked prefill leaves a window start far behind the
    next block: the set no longer fits, so the row keeps its sliding window."""
    from vllm_specextend.retrieval.working_set import WorkingSets, working_set_positions

    sets = WorkingSets(torch.zeros(1, 4, dtype=torch.bool), torch.tensor([10]), chunk_size=4)
    first_positions = torch.tensor([30])  # 20 positions past the window start
    set_positions, set_counts = working_set_positions(sets, first_positions, max_len=31, max_keys=8)
    assert int(set_counts[0]) == 20  # says it overflowed; no index error
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    rows = plan_draft_rows(qsl, torch.tensor([31], dtype=torch.int32),
                           torch.zeros(1, 8, dtype=torch.int32), 8, 4, 12,
                           (set_positions, set_counts))
    assert keys(rows, 0) == list(range(22, 31))
    assert not rows.uses_working_set.any()
