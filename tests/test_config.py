"""SpecExtendConfig on its own: defaults, budget, and error messages."""

import pytest

from vllm_specextend.config import (
    SpecExtendConfig,
    SpecExtendConfigError,
    split_speculative_config,
)

VLLM_FIELDS = ["method", "model", "num_speculative_tokens", "max_model_len"]


def test_paper_defaults():
    settings = SpecExtendConfig()
    assert (settings.chunk_size, settings.top_k_chunks, settings.refresh_every) == (32, 32, 4)
    assert settings.hybrid_tree_attention_min_len == 4096
    assert settings.retrieval and not settings.hybrid_tree_attention
    # 32 chunks x 32 + 256 recent + 4 refreshes x (4 + 1) tokens
    assert settings.working_cache_budget(num_speculative_tokens=4) == 1300
    assert settings.effective_retrieval_min_len(4) == 1300
    assert SpecExtendConfig(retrieval_min_len=512).effective_retrieval_min_len(4) == 512


def test_split_keeps_vllm_keys_and_normalizes_dashes():
    settings, rest = split_speculative_config(
        {"method": "specextend", "model": "d", "num-speculative-tokens": 3, "top-k-chunks": 8},
        VLLM_FIELDS,
    )
    assert settings.top_k_chunks == 8
    assert rest == {"method": "specextend", "model": "d", "num_speculative_tokens": 3}


def test_unknown_key_is_named():
    with pytest.raises(SpecExtendConfigError, match="'chunk_sise'.*chunk_size"):
        split_speculative_config({"chunk_sise": 32}, VLLM_FIELDS)


@pytest.mark.parametrize(
    "field,value",
    [("chunk_size", 0), ("top_k_chunks", -1), ("recent_tokens", 0), ("refresh_every", 0),
     ("retrieval_min_len", 0), ("hybrid_tree_attention_min_len", -4096)],
)
def test_non_positive_sizes_are_named_with_range(field, value):
    with pytest.raises(SpecExtendConfigError) as info:
        SpecExtendConfig.from_settings({field: value})
    message = str(info.value)
    assert f"speculative_config.{field}={value}" in message
    assert "allowed: an integer > 0" in message


def test_wrong_type_is_named():
    with pytest.raises(SpecExtendConfigError, match=r"speculative_config\.retrieval="):
        SpecExtendConfig.from_settings({"retrieval": "sometimes"})


FIT = dict(block_size=16, draft_max_positions=2048, num_speculative_tokens=4,
           draft_model_type="llama")


def test_fits_default_engine():
    SpecExtendConfig().check_fits_engine(**FIT)


def test_chunk_not_multiple_of_block():
    with pytest.raises(SpecExtendConfigError, match=r"chunk_size=40 must be a multiple of the KV cache block size \(16\)"):
        SpecExtendConfig(chunk_size=40).check_fits_engine(**FIT)


def test_working_cache_larger_than_draft_positions():
    with pytest.raises(SpecExtendConfigError) as info:
        SpecExtendConfig(top_k_chunks=64).check_fits_engine(**FIT)
    message = str(info.value)
    assert message.startswith("speculative_config.top_k_chunks")
    # (2044 - 256 recent - 20 between refreshes) // 32 = 55 chunks fit.
    assert "top_k_chunks in [1, 55]" in message
    SpecExtendConfig(top_k_chunks=55).check_fits_engine(**FIT)


def test_unsupported_draft_model_type():
    with pytest.raises(SpecExtendConfigError, match="speculative_config.model.*'gpt2'"):
        SpecExtendConfig().check_fits_engine(**{**FIT, "draft_model_type": "gpt2"})


def test_tree_mode_budget_counts_the_deepest_path():
    """Trees accept at most tree_max_depth + 1 tokens a step, whatever the
    node budget (vLLM's num_speculative_tokens)."""
    tree = SpecExtendConfig(tree=True, tree_nodes=50, tree_max_depth=10)
    assert tree.verifies_with_hta and tree.tokens_per_step(50) == 11
    # 32 x 32 + 256 + 4 refreshes x 11 tokens
    assert tree.working_cache_budget(50) == 1324
    # The first pass (50 nodes + bonus) and a path of 10 on top of the window.
    assert tree.draft_positions_past_window(50) == 61


@pytest.mark.parametrize("field,value,allowed", [
    ("tree_nodes", 64, "less than or equal to 63"),
    ("tree_max_depth", 33, "less than or equal to 32"),
    ("tree_threshold", -0.1, "greater than or equal to 0"),
])
def test_tree_limits_are_named(field, value, allowed):
    with pytest.raises(SpecExtendConfigError, match=rf"speculative_config\.{field}={value}.*{allowed}"):
        SpecExtendConfig.from_settings({field: value})
