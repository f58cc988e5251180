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


def test_a_draft_forward_plans_each_sub_batch_over_its_own_cache():
    """A round of three rows, the middle one over working cache 1 (offset
    1000: its window starts 1000 tokens before its true positions). The
    first pass reads true positions; the first draft step moves the row to
    compact ones and drops its writes to vLLM's cache."""
    import torch

    from vllm_specextend.config import WorkingCacheGeometry
    from vllm_specextend.retrieval.working_caches import DraftRound, WorkingCaches

    geometry = WorkingCacheGeometry(draft_window=256, chunk_size=16, top_k_chunks=4,
                                    recent_tokens=64, tokens_between_refreshes=8,
                                    positions_past_window=4, retrieval_min_len=200,
                                    whole_context_max_len=200, main_window=256)
    layer = type("Layer", (), {"num_kv_heads": 1, "head_size": 4, "head_size_v": 4})()
    caches = WorkingCaches({"layer": layer}, geometry, num_caches=2, block_size=16,
                           dtype=torch.float32, device=torch.device("cpu"), move_back=None)
    caches.offsets[1] = 1000
    staging = type("Staging", (), {"to_device": lambda self, name, v: torch.from_numpy(v)})()
    draft_round = DraftRound(caches, np.array([NO_CACHE, 1, NO_CACHE]),
                             first_pass_query_lens=np.array([2, 3, 1]), staging=staging)
    seq_lens = torch.tensor([300, 1100, 50])
    cad = type("Metadata", (), {"seq_lens": seq_lens, "max_seq_len": 1100,
                                "block_table_tensor": torch.arange(3 * 70).view(3, 70),
                                "slot_mapping": torch.arange(6) + 500})()
    built = []

    def metadata_of(query_lens, query_start_loc, seq_lens, block_table, slots, max_seq_len):
        built.append((query_lens.tolist(), seq_lens.tolist(), slots.tolist(), max_seq_len))
        return len(built)

    positions = torch.tensor([298, 299, 1097, 1098, 1099, 49])
    plan, edits = draft_round.plan_forward(metadata_of, cad, positions, draft_index=0)
    compact_slots = (caches.slot_base(torch.tensor([1])) + torch.tensor([97, 98, 99])).tolist()
    assert built == [([3], [100], compact_slots, geometry.capacity),
                     ([2, 1], [300, 50], [500, 501, 505], 1100)]
    assert plan.compact_tokens.tolist() == [2, 3, 4] and plan.main_tokens.tolist() == [0, 1, 5]
    assert plan.compact_offsets.tolist() == [1000] * 3  # rotated back in the forward
    assert edits.positions is None and not edits.drop_cache_writes

    built.clear()
    step_positions = torch.tensor([300, 1100, 50])  # one token a row from here
    cad.slot_mapping = torch.tensor([600, 601, 602])
    plan, edits = draft_round.plan_forward(metadata_of, cad, step_positions, draft_index=1)
    assert edits.tokens.tolist() == [1] and edits.positions.tolist() == [100]
    assert edits.drop_cache_writes and plan.compact_offsets is None
    edits.apply(step_positions, cad.slot_mapping)
    assert step_positions.tolist() == [300, 100, 50]
    assert cad.slot_mapping.tolist() == [600, NO_CACHE, 602]
