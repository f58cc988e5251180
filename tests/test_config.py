"""SpecExtendConfig on its own: defaults, the working cache's geometry, and
error messages."""

import pytest

from vllm_specextend.config import (
    SpecExtendConfig,
    SpecExtendConfigError,
    split_speculative_config,
)

VLLM_FIELDS = ["method", "model", "num_speculative_tokens", "max_model_len"]


def test_defaults_follow_the_draft_window():
    settings = SpecExtendConfig()
    assert (settings.chunk_size, settings.refresh_every, settings.recent_tokens) == (32, 4, 256)
    assert settings.top_k_chunks is None and settings.draft_window is None
    assert settings.hybrid_tree_attention_min_len == 4096
    assert settings.retrieval and not settings.hybrid_tree_attention
    geometry = settings.geometry(draft_max_positions=2048, num_speculative_tokens=4)
    # The window holds (2048 - 256 recent - 31 alignment - 4 x 5 growth - 4 drafts) // 32.
    assert geometry.draft_window == 2048 and geometry.top_k_chunks == 54
    assert geometry.capacity == 54 * 32 + 256 + 31 + 20 + 4 == 2039
    # Retrieval starts where the window can no longer show the whole context
    # until the next refresh; requests without a working cache slide over 2048.
    assert geometry.retrieval_min_len == 2048 - 20 - 4
    assert geometry.main_window == 2048
    # A draft that reads 32K positions keeps its whole context up to there.
    assert settings.geometry(draft_max_positions=32768,
                             num_speculative_tokens=4).retrieval_min_len == 32744


def test_paper_settings_are_one_key_away():
    paper = SpecExtendConfig(draft_window=2048, top_k_chunks=32)
    geometry = paper.geometry(draft_max_positions=32768, num_speculative_tokens=4)
    # The paper's 1,300-token budget (32 x 32 + 256 + 4 x 5), plus alignment and drafts.
    assert geometry.capacity == 1300 + 31 + 4
    assert SpecExtendConfig(retrieval_min_len=512).geometry(
        draft_max_positions=2048, num_speculative_tokens=4).retrieval_min_len == 512


def test_a_smaller_working_cache_gives_requests_in_between_the_choice():
    """The paper's working cache under a draft that reads 32K positions: it
    is sized by working_cache_window, the sliding window by draft_window,
    and contexts between the two may draft either way."""
    geometry = SpecExtendConfig(working_cache_window=2048, top_k_chunks=32).geometry(
        draft_max_positions=32768, num_speculative_tokens=4)
    assert geometry.capacity == 1300 + 31 + 4
    assert geometry.retrieval_min_len == 2048 - 20 - 4
    assert geometry.whole_context_max_len == 32768 - 20 - 4
    assert geometry.main_window == 32768
    # Without it no context has the choice, whatever retrieval_min_len says.
    for settings in (SpecExtendConfig(), SpecExtendConfig(retrieval_min_len=512)):
        geometry = settings.geometry(draft_max_positions=2048, num_speculative_tokens=4)
        assert geometry.whole_context_max_len == geometry.retrieval_min_len


@pytest.mark.parametrize("settings,message", [
    ({"draft_window": 4096}, r"speculative_config\.draft_window=4096 exceeds the draft's "
                             r"max_position_embeddings \(2048\).*\[1, 2048\]"),
    ({"working_cache_window": 4096}, r"speculative_config\.working_cache_window=4096 "
                                     r"exceeds draft_window=2048.*\[1, 2048\]"),
    ({"working_cache_window": 1024, "top_k_chunks": 32},
     r"top_k_chunks.*exceeds working_cache_window=1024.*top_k_chunks in \[1, 22\]"),
])
def test_windows_past_what_holds_them_are_named(settings, message):
    with pytest.raises(SpecExtendConfigError, match=message):
        SpecExtendConfig(**settings).geometry(draft_max_positions=2048,
                                              num_speculative_tokens=4)


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


FIT = dict(block_size=16, max_model_len=4096, draft_max_positions=2048,
           num_speculative_tokens=4, draft_model_type="llama")


def test_fits_default_engine():
    SpecExtendConfig().check_fits_engine(**FIT)


def test_chunk_not_multiple_of_block():
    with pytest.raises(SpecExtendConfigError, match=r"chunk_size=40 must be a multiple of the KV cache block size \(16\)"):
        SpecExtendConfig(chunk_size=40).check_fits_engine(**FIT)


def test_retrieval_runs_only_where_a_request_can_pass_the_window():
    """At max_model_len 2,024 (= retrieval_min_len) no request gets a working
    cache and no draft query (its 4 drafts included) spans 2,048 positions:
    no chunks to fit into blocks, no sliding window."""
    settings = SpecExtendConfig(chunk_size=40)
    geometry = settings.geometry(draft_max_positions=2048, num_speculative_tokens=4)
    assert not settings.builds_working_caches(geometry, 2024)
    assert settings.builds_working_caches(geometry, 2025)
    assert not SpecExtendConfig(retrieval=False).builds_working_caches(geometry, 4096)
    assert not geometry.window_binds(2044) and geometry.window_binds(2045)
    settings.check_fits_engine(**{**FIT, "max_model_len": 2024})


def test_working_cache_larger_than_the_draft_window():
    with pytest.raises(SpecExtendConfigError) as info:
        SpecExtendConfig(top_k_chunks=64).check_fits_engine(**FIT)
    message = str(info.value)
    assert message.startswith("speculative_config.top_k_chunks")
    assert "exceeds draft_window=2048" in message
    assert "top_k_chunks in [1, 54]" in message
    SpecExtendConfig(top_k_chunks=54).check_fits_engine(**FIT)
    with pytest.raises(SpecExtendConfigError, match=r"top_k_chunks in \[1, 0\]"):
        SpecExtendConfig(draft_window=256).check_fits_engine(**FIT)


def test_unsupported_draft_model_type():
    with pytest.raises(SpecExtendConfigError, match="speculative_config.model.*'gpt2'"):
        SpecExtendConfig().check_fits_engine(**{**FIT, "draft_model_type": "gpt2"})


def test_tree_mode_geometry_counts_the_deepest_path():
    """Trees accept at most tree_max_depth + 1 tokens a step, whatever the
    node budget (vLLM's num_speculative_tokens); the first pass (50 nodes +
    bonus) and a path of 10 come on top of the window."""
    tree = SpecExtendConfig(tree=True, tree_nodes=50, tree_max_depth=10)
    assert tree.verifies_with_hta and tree.tokens_per_step(50) == 11
    assert tree.draft_positions_past_window(50) == 61
    geometry = tree.geometry(draft_max_positions=2048, num_speculative_tokens=50)
    assert geometry.tokens_between_refreshes == 44
    assert geometry.top_k_chunks == (2048 - 256 - 31 - 44 - 61) // 32
    # A node spans its root's window and its path: the window leaves room.
    assert geometry.main_window == 2048 - 10


@pytest.mark.parametrize("field,value,allowed", [
    ("tree_nodes", 64, r"less than or equal to 63 \(allowed: an integer > 0 and <= 63\)"),
    ("tree_max_depth", 33, r"less than or equal to 32 \(allowed: an integer > 0 and <= 32\)"),
    ("tree_threshold", -0.1, r"greater than or equal to 0 \(allowed: a number >= 0\)"),
])
def test_tree_limits_are_named(field, value, allowed):
    with pytest.raises(SpecExtendConfigError, match=rf"speculative_config\.{field}={value}.*{allowed}"):
        SpecExtendConfig.from_settings({field: value})


def test_the_policy_turns_off_where_it_cannot_serve_unless_asked_for():
    settings, why = SpecExtendConfig().servable_policy(async_scheduling=True)
    assert not settings.adaptive and "async scheduling" in why
    settings, why = SpecExtendConfig(tree=True).servable_policy(async_scheduling=False)
    assert not settings.adaptive and "tree=true" in why
    assert SpecExtendConfig().servable_policy(async_scheduling=False) == (SpecExtendConfig(),
                                                                          None)
    with pytest.raises(SpecExtendConfigError, match=r"adaptive=true: async scheduling"):
        SpecExtendConfig(adaptive=True).servable_policy(async_scheduling=True)


def test_tree_mode_sets_vllms_draft_budget_to_the_nodes():
    tree = SpecExtendConfig(tree=True, tree_nodes=6)
    given = {"model": "draft"}
    assert tree.tree_speculative_config(given, async_scheduling=None) == {
        "model": "draft", "num_speculative_tokens": 6}
    assert given == {"model": "draft"}
    with pytest.raises(SpecExtendConfigError, match=r"num_speculative_tokens=4"):
        tree.tree_speculative_config({"num_speculative_tokens": 4}, async_scheduling=None)
