"""The plugin's hot path makes the host wait for the device nowhere: a real
engine decodes a batch where one request drafts over its working cache
(refreshed every other step) and one over vLLM's cache, both verified with
Hybrid Tree Attention (its rows planned once per step), with every torch
call that syncs counted when the plugin's own code makes it (outside the
`*_cpu` functions only vLLM's CPU build runs). Tree mode is counted too:
its count is reported, and it shows the counter sees the plugin's calls."""

import pytest

from conftest import run_engine

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompts(mixed_prompts):
    return [mixed_prompts[-1], mixed_prompts[1]]  # 3,000 tokens (past the window), 700


def counted(tiny_pair, prompts, tmp_path, **settings):
    job = {"model": tiny_pair.target, "prompts": prompts, "max_tokens": NEW_TOKENS,
           "count_host_syncs": True,
           "speculative_config": {"method": "specextend", "model": tiny_pair.draft,
                                  "chunk_size": 32, "top_k_chunks": 4, "recent_tokens": 64,
                                  "refresh_every": 2, **settings}}
    return run_engine(job, tmp_path)


def test_chain_drafting_with_working_caches_never_syncs(tiny_pair, prompts, tmp_path):
    result, log = counted(tiny_pair, prompts, tmp_path, num_speculative_tokens=4,
                          hybrid_tree_attention=True, hybrid_tree_attention_min_len=512)
    assert "first working caches filled (1 of 2 requests" in log
    assert "Hybrid Tree Attention verified its first rows (chains)" in log
    syncs = result["host_syncs"]
    assert syncs["drafting_rounds"] > NEW_TOKENS // 5  # every step drafted
    assert syncs["by_site"] == {}


def test_tree_mode_count_is_reported(tiny_pair, prompts, tmp_path):
    result, _ = counted(tiny_pair, prompts, tmp_path, tree=True, tree_nodes=8,
                        tree_max_depth=3)
    syncs = result["host_syncs"]
    per_round = sum(syncs["by_site"].values()) / syncs["drafting_rounds"]
    print(f"tree mode: {per_round:.1f} host syncs per step from the plugin; sites:")
    for site, count in sorted(syncs["by_site"].items(), key=lambda item: -item[1]):
        print(f"  {count:5d}  {site}")
    assert per_round > 0  # trees are planned on the host: the counter sees it
