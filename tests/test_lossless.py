"""Greedy output ids of `method: specextend` equal the target-only run's, for
a batch of mixed lengths including prompts beyond the draft's positions."""

import re

import pytest

from conftest import MIXED_PROMPT_LENGTHS, run_engine

MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def target_only(tiny_pair, mixed_prompts, tmp_path_factory):
    job = {"model": tiny_pair.target, "prompts": mixed_prompts, "max_tokens": MAX_NEW_TOKENS}
    result, _ = run_engine(job, tmp_path_factory.mktemp("target_only"))
    return result


# A small working cache (4 x 32 + 64 + refresh x 5 tokens, at most 232) so
# the 1,500..3,000-token prompts are over 4x past it and 100 is below it.
SMALL_BUDGET = {"chunk_size": 32, "top_k_chunks": 4, "recent_tokens": 64}


# Refresh every step, every 8 steps, the recency-only ablation,
# verification through the Hybrid Tree Attention backend for prefixes >= 64,
# and tree mode with CMR on and off.
HYBRID_TREE_ATTENTION = {"hybrid_tree_attention": True, "hybrid_tree_attention_min_len": 64}
TREES = {"tree": True, "tree_nodes": 12, "tree_max_depth": 5}
VARIANTS = [{"refresh_every": 1}, {"refresh_every": 8},
            {"refresh_every": 4, "selection": "recency"},
            {"refresh_every": 4, **HYBRID_TREE_ATTENTION},
            {"refresh_every": 2, **TREES},
            {"refresh_every": 4, "retrieval": False, **TREES}]
CHAIN_DRAFT_TOKENS = 4


@pytest.fixture(scope="module", params=VARIANTS,
                ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def specextend_run(request, tiny_pair, mixed_prompts, tmp_path_factory):
    variant = request.param
    job = {
        "model": tiny_pair.target,
        "speculative_config": {
            "method": "specextend",
            "model": tiny_pair.draft,
            # Tree mode: vLLM's draft tokens are the tree's nodes.
            **({} if variant.get("tree") else {"num_speculative_tokens": CHAIN_DRAFT_TOKENS}),
            **SMALL_BUDGET,
            **variant,
        },
        "prompts": mixed_prompts,
        "max_tokens": MAX_NEW_TOKENS,
        "collect_worker_settings": True,
        "request_state": True,
        "tree_reordered_buffers": True,
    }
    result, log = run_engine(job, tmp_path_factory.mktemp("specextend"))
    return result, log, variant


def test_greedy_ids_equal_target_only(target_only, specextend_run):
    result, _, _ = specextend_run
    assert len(result["token_ids"]) == len(MIXED_PROMPT_LENGTHS)
    for length, expected, got in zip(
        MIXED_PROMPT_LENGTHS, target_only["token_ids"], result["token_ids"]
    ):
        assert len(got) == MAX_NEW_TOKENS
        assert got == expected, f"prompt of {length} tokens diverged"


def test_draft_within_its_window_runs_as_stock(tiny_pair, mixed_prompts, target_only, tmp_path):
    """max_model_len 1,024 is within the tiny draft's 2,048 positions: the
    engine keeps vLLM's CPU blocks of 128, sets no sliding window on the
    draft's layers, builds no working cache, and stays lossless."""
    prompts = [p for p in mixed_prompts if len(p) + MAX_NEW_TOKENS <= 1024]
    speculative_config = {"method": "specextend", "model": tiny_pair.draft,
                          "num_speculative_tokens": CHAIN_DRAFT_TOKENS}
    job = {"model": tiny_pair.target, "prompts": prompts, "max_tokens": MAX_NEW_TOKENS,
           "max_model_len": 1024, "speculative_config": speculative_config,
           "record_attention_spans": True}
    result, log = run_engine(job, tmp_path)
    assert result["token_ids"] == target_only["token_ids"][: len(prompts)]
    assert result["spec_decode"]["vllm:spec_decode_num_accepted_tokens"] > 0
    spans = result["attention_spans"]
    assert spans["draft_windows"] == [] and spans["working_cache_calls"] == 0
    assert spans["vllm_cache_block_sizes"] == [128]
    assert "Cross-model Retrieval idle: max_model_len=1024 is within retrieval_min_len=2024" in log
    assert "allocated at load, before vLLM sizes its KV cache: nothing" in log


def test_retrieval_ran_and_drafts_were_accepted(specextend_run):
    result, log, variant = specextend_run
    counters = result["spec_decode"]
    assert counters["vllm:spec_decode_num_drafts"] > 0
    assert counters["vllm:spec_decode_num_accepted_tokens"] > 0
    if not variant.get("retrieval", True):
        assert "working caches" not in log
        return
    # Prompts past the draft window (2,048) less what grows until the next
    # refresh (a chain's drafts or a tree's deepest path, plus the bonus, per
    # step) and the drafts past it got working caches.
    per_step = variant.get("tree_max_depth", CHAIN_DRAFT_TOKENS) + 1
    past = (variant["tree_nodes"] + 1 + variant["tree_max_depth"] if variant.get("tree")
            else CHAIN_DRAFT_TOKENS)
    threshold = 2048 - variant["refresh_every"] * per_step - past
    assert re.search(rf"first working caches filled \(\d+ of \d+ requests past {threshold} tokens\)",
                     log)


def test_finished_requests_leave_no_state(specextend_run):
    result, _, _ = specextend_run
    state = result["request_state"]
    assert state == {**state, "specextend": True, "vllm_requests": 0,
                     "working_cache_holders": 0, "proposed_trees": 0}


def test_hybrid_tree_attention_verified_rows(specextend_run):
    _, log, variant = specextend_run
    verified = "Hybrid Tree Attention verified its first rows" in log
    assert verified == bool(variant.get("hybrid_tree_attention") or variant.get("tree"))


def test_tree_mode_drafted_trees(specextend_run):
    result, log, variant = specextend_run
    assert ("drafted the first trees" in log) == bool(variant.get("tree"))
    if variant.get("tree"):
        assert "tree mode on" in log
        # Trees of up to tree_nodes nodes went to vLLM as draft tokens.
        counters = result["spec_decode"]
        per_draft = counters["vllm:spec_decode_num_draft_tokens"] / counters["vllm:spec_decode_num_drafts"]
        assert 1 < per_draft <= variant["tree_nodes"]


def test_tree_compaction_reorders_the_captured_target_queries(specextend_run):
    """After a tree step the runner's rows are put in chain order; the
    target's captured final-layer queries must follow, or the next refresh
    scores chunks with another token's query."""
    result, _, variant = specextend_run
    reordered = result["tree_reordered_buffers"]
    if not variant.get("tree"):
        uses_hta = bool(variant.get("hybrid_tree_attention"))
        assert (reordered is not None) == uses_hta  # HTA chains: verification, no compaction
        return
    expected = ["input_ids", "positions"]
    if variant.get("retrieval", True):
        expected.insert(0, "captured target queries")
    assert reordered == expected


def test_only_tree_mode_and_hta_load_the_trees_package(specextend_run):
    result, _, variant = specextend_run
    uses_trees = bool(variant.get("tree") or variant.get("hybrid_tree_attention"))
    assert result["trees_package_loaded"] == [uses_trees]


def test_settings_reach_the_workers(specextend_run):
    result, log, variant = specextend_run
    expected = {**SMALL_BUDGET, **variant}
    [worker_settings] = result["worker_settings"]  # one worker (TP=1)
    assert {k: worker_settings[k] for k in expected} == expected
    lines = log.splitlines()
    settings = [l for l in lines if "SpecExtend settings (worker)" in l and "top_k_chunks=4" in l]
    assert len(settings) == 1, f"the worker logged its settings {len(settings)} times"
    front = [l for l in lines if "SpecExtend settings (front end)" in l]
    assert len(front) == 1
    retrieval = ("Cross-model Retrieval on" if variant.get("retrieval", True)
                 else "retrieval=false")
    drafting = "tree mode on" if variant.get("tree") else "chain drafts"
    assert any(retrieval in l and f"; {drafting}" in l for l in lines)
