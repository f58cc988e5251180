"""Tensor parallelism on vLLM's CPU build (2 ranks, one core each): a mixed
batch with working caches, for the tiny draft (one request with a choice
of context) and for an EAGLE-3 head; greedy ids equal the target alone's at
the same parallelism, and both ranks keep the same chunks at every refresh
(each scores with its own heads; the scores are averaged across ranks)."""

import re

import pytest

from conftest import MIXED_PROMPT_LENGTHS, run_engine
from vllm_specextend.models.eagle3 import build_random_eagle3_head

TWO_RANKS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
MAX_NEW_TOKENS = 16
SMALL_BUDGET = {"chunk_size": 32, "top_k_chunks": 4, "recent_tokens": 64, "refresh_every": 2}


def job(target, prompts, speculative_config=None):
    return {"model": target, "prompts": prompts, "max_tokens": MAX_NEW_TOKENS,
            "engine_kwargs": {"tensor_parallel_size": 2},
            "speculative_config": speculative_config,
            "record_chunk_choices": speculative_config is not None}


@pytest.fixture(scope="module")
def target_only(tiny_pair, mixed_prompts, tmp_path_factory):
    result, _ = run_engine(job(tiny_pair.target, mixed_prompts),
                           tmp_path_factory.mktemp("tp_target_only"), TWO_RANKS)
    return result["token_ids"]


@pytest.mark.parametrize("drafter", ["draft_model", "eagle3"])
def test_two_ranks_lossless_and_of_one_mind(tiny_pair, mixed_prompts, target_only, drafter,
                                            tmp_path):
    if drafter == "eagle3":
        head = build_random_eagle3_head(tiny_pair.target, tmp_path / "head", 2048)
        spec = {"model": head, "draft_method": "eagle3"}
    else:
        # The 1,500-token request also chooses its context (a working cache
        # of 1,024 positions or its whole context under the draft's 2,048):
        # rank 0's choice reaches rank 1 with the picks.
        spec = {"model": tiny_pair.draft, "working_cache_window": 1024}
    spec = {"method": "specextend", "num_speculative_tokens": 3, **spec, **SMALL_BUDGET}
    result, log = run_engine(job(tiny_pair.target, mixed_prompts, spec), tmp_path / "run",
                             TWO_RANKS)
    for length, expected, got in zip(MIXED_PROMPT_LENGTHS, target_only, result["token_ids"]):
        assert got == expected, f"prompt of {length} tokens diverged"
    assert "first working caches filled" in log
    # Each rank's process loads the plugin and logs its settings once. vLLM
    # prefixes a worker's lines "(VllmWorker-R pid=..)" until it renames
    # itself "(Worker_TPR pid=..)".
    def worker_lines(text):
        return [l for l in log.splitlines() if re.match(r"\((Vllm)?Worker", l) and text in l]
    assert len({l.split(")")[0] for l in worker_lines("vllm-specextend plugin loaded")}) == 2
    assert len(worker_lines("SpecExtend settings (worker)")) == 2
    first_rank, second_rank = result["chunk_choices"]
    assert len(first_rank) > 2  # refreshes happened
    assert first_rank == second_rank
