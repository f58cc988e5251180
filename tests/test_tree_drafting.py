"""Pieces of the draft's tree forwards that need no engine: the root's
context taken from the first pass's rows, and scratch rows in the mirror."""

import torch

from vllm_specextend.paged_cache import slots_of
from vllm_specextend.retrieval.draft_rows import plan_draft_rows
from vllm_specextend.vllm_glue.kv_mirror import KVMirror
from vllm_specextend.vllm_glue.tree_drafting import root_context


def test_root_context_ends_at_the_root_and_skips_later_queries():
    """Request 0 is a prefill of 10 tokens cut into pieces of 4 (root: its
    last token); request 1 verified 3 tokens, accepted 1, and its root (the
    bonus) is followed by 2 rejected slots in the same row."""
    block_size = 4
    block_table = torch.tensor([[3, 1, 2, 0, 8, 9, 10], [5, 6, 7, 4, 11, 12, 13]],
                               dtype=torch.int32)
    query_start_loc = torch.tensor([0, 10, 15])
    seq_lens = torch.tensor([10, 25])
    rows = plan_draft_rows(query_start_loc, seq_lens, block_table, window=6, piece_len=4,
                           draft_max_positions=16)
    roots = torch.tensor([9, 12])  # request 1: positions 20, 21 accepted, root at 22
    slots, lens = root_context(rows, roots, block_size)
    assert lens.tolist() == [6 + 2, 6 + 3]
    expected = [list(range(2, 10)), list(range(14, 23))]
    for request, positions in enumerate(expected):
        want = slots_of(block_table[request], torch.tensor(positions), block_size)
        assert slots[request, : lens[request]].tolist() == want.tolist()


def test_scratch_rows_grow_after_the_cache_slots_and_keep_the_mirror():
    mirror = KVMirror()
    kv_cache = torch.zeros(2, 4, 8, 2, 3)  # 32 slots of 2 heads x 3
    keys = torch.randn(5, 2, 3)
    slots = torch.tensor([0, 7, 31, -1, 12])
    mirror.write(kv_cache, keys, keys + 1, slots, 5)
    assert mirror.reserve_scratch(10) == 32 and mirror.keys.shape[0] == 42
    assert mirror.reserve_scratch(12) == 32 and mirror.keys.shape[0] == 52  # doubled
    assert mirror.reserve_scratch(4) == 32 and mirror.keys.shape[0] == 52
    written = slots >= 0
    assert torch.equal(mirror.keys[slots[written]], keys[written])
    assert torch.equal(mirror.values[slots[written]], keys[written] + 1)
