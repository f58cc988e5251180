"""Which request holds which working cache, when it is refilled, and how a
drafting round's rows split by where they draft (no vLLM)."""

import numpy as np

from vllm_specextend.retrieval.draft_rows import RowSplit
from vllm_specextend.retrieval.ownership import NO_CACHE, WorkingCacheOwners


def test_eligible_requests_take_free_caches_and_the_rest_keep_their_window():
    owners = WorkingCacheOwners(num_caches=2)
    ids = ["a", "b", "c", "d"]
    due = owners.due_rows(ids, np.array([True, False, True, True]),
                          np.array([3000, 100, 4000, 5000]), round_index=0, refresh_every=4)
    assert due.tolist() == [0, 2]  # "d" finds no free cache
    assert owners.caches_of(ids).tolist() == [0, NO_CACHE, 1, NO_CACHE]


def test_holders_refill_every_refresh_every_rounds_and_after_a_skipped_one():
    owners = WorkingCacheOwners(num_caches=1)
    refilled = []
    for round_index in range(9):
        due = owners.due_rows(["a"], np.array([True]), np.array([3000 + round_index]),
                              round_index, refresh_every=4)
        refilled += [round_index] * len(due)
    assert refilled == [0, 4, 8]
    assert owners.filled_at[0] == 3008
    # A round ran no draft forward: the next that drafts refills.
    owners.refill_next(["a", "b"])
    assert owners.due_rows(["a"], np.array([True]), np.array([3010]), 9, 4).tolist() == [0]
    assert owners.due_rows(["a"], np.array([True]), np.array([3011]), 10, 4).tolist() == []


def test_a_cache_is_freed_when_its_request_leaves_finishes_or_restarts():
    owners = WorkingCacheOwners(num_caches=2)
    owners.due_rows(["a", "b"], np.array([True, True]), np.array([3000, 3000]), 0, 4)
    # "a" was preempted and is recomputed from its prompt: fewer tokens.
    owners.keep_holders(["a", "b"], np.array([512, 3001]))
    assert owners.caches_of(["a", "b"]).tolist() == [NO_CACHE, 1]
    owners.keep_holders(["c"], np.array([10]))  # "b" left the batch
    assert owners.holder == {}
    owners.due_rows(["c"], np.array([True]), np.array([3000]), 1, 4)
    owners.release("c")
    assert owners.holder == {}
    # A freed cache is taken again, refilled in the round it is taken.
    due = owners.due_rows(["d"], np.array([True]), np.array([3000]), 2, 4)
    assert due.tolist() == [0] and owners.filled_round[owners.holder["d"]] == 2


def test_a_rounds_rows_split_by_where_they_draft():
    """Rows 0 and 2 hold working caches; the first pass runs 3, 1, 2, 1
    tokens (verified drafts plus the bonus token), each draft step one."""
    rows = RowSplit.of(np.array([4, NO_CACHE, 0, NO_CACHE]))
    assert rows.compact_rows.tolist() == [0, 2] and rows.main_rows.tolist() == [1, 3]
    first = rows.tokens(np.array([3, 1, 2, 1]))
    assert first.num_tokens == 7
    assert first.compact_tokens.tolist() == [0, 1, 2, 4, 5]
    assert first.compact_token_rows.tolist() == [0, 0, 0, 1, 1]
    assert first.compact_query_start_loc.tolist() == [0, 3, 5]
    assert first.main_tokens.tolist() == [3, 6]
    assert first.main_query_start_loc.tolist() == [0, 1, 2]
    step = rows.tokens(np.ones(4, dtype=np.int64))
    assert step.compact_tokens.tolist() == [0, 2] and step.main_tokens.tolist() == [1, 3]
