"""Bad SpecExtend settings fail in `LLM(...)` at start-up, before any engine
process starts, with a message naming the field."""

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from vllm import LLM  # noqa: E402

from vllm_specextend import SpecExtendConfigError  # noqa: E402


def start(tiny_pair, draft=None, engine_kwargs=None, **settings):
    return LLM(
        model=tiny_pair.target,
        speculative_config={
            "method": "specextend",
            "model": draft or tiny_pair.draft,
            "num_speculative_tokens": 4,
            **settings,
        },
        max_model_len=4096,
        dtype="float32",
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        **(engine_kwargs or {}),
    )


@pytest.fixture(scope="module")
def gpt2_draft(tiny_pair, tmp_path_factory):
    """A draft without rotary positions: CMR's compact positions need RoPE."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2_draft")
    config = GPT2Config(vocab_size=384, n_positions=2048, n_embd=64, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_pair.target).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "settings,pattern",
    [
        ({"chunk_sise": 32}, r"unknown key\(s\) 'chunk_sise'"),
        ({"chunk_size": 0}, r"speculative_config\.chunk_size=0.*allowed: an integer > 0"),
        ({"top_k_chunks": -3}, r"speculative_config\.top_k_chunks=-3.*allowed: an integer > 0"),
        ({"refresh_every": 0}, r"speculative_config\.refresh_every=0"),
        ({"recent_tokens": -1}, r"speculative_config\.recent_tokens=-1"),
        ({"top_k_chunks": 64}, r"speculative_config\.top_k_chunks: the working cache .* "
                               r"exceeds draft_window=2048"),
        ({"draft_window": 4096}, r"speculative_config\.draft_window=4096 exceeds the draft's "
                                 r"max_position_embeddings \(2048\)"),
        ({"adaptive": 3}, r"speculative_config\.adaptive=3.*allowed: true or false"),
        ({"tree": True, "tree_nodes": 4, "adaptive": True},
         r"speculative_config\.adaptive=true: tree=true drafts trees.*set adaptive to false"),
    ],
)
def test_bad_setting_named(tiny_pair, settings, pattern):
    with pytest.raises(SpecExtendConfigError, match=pattern):
        start(tiny_pair, **settings)


def test_chunk_size_not_multiple_of_block_size(tiny_pair):
    with pytest.raises(SpecExtendConfigError,
                       match=r"chunk_size=48 must be a multiple of the KV cache block size \(32\)"):
        start(tiny_pair, engine_kwargs={"block_size": 32}, chunk_size=48)


def test_quantized_kv_cache_is_refused(tiny_pair):
    with pytest.raises(SpecExtendConfigError, match=r"kv_cache_dtype=fp8: .*leave kv_cache_dtype"):
        start(tiny_pair, engine_kwargs={"kv_cache_dtype": "fp8"})


def test_pipeline_parallelism_is_refused(tiny_pair):
    with pytest.raises(SpecExtendConfigError,
                       match=r"pipeline_parallel_size=2: .*tensor_parallel_size"):
        start(tiny_pair, engine_kwargs={"pipeline_parallel_size": 2})


def test_unsupported_draft_model(tiny_pair, gpt2_draft):
    with pytest.raises(SpecExtendConfigError, match=r"speculative_config\.model: .*'gpt2'"):
        start(tiny_pair, draft=gpt2_draft)


def test_tree_node_budget_conflicts_with_num_speculative_tokens(tiny_pair):
    with pytest.raises(SpecExtendConfigError,
                       match=r"speculative_config\.num_speculative_tokens=4: with tree=true"):
        start(tiny_pair, tree=True, tree_nodes=8)


def test_tree_mode_refuses_async_scheduling(tiny_pair):
    with pytest.raises(SpecExtendConfigError, match=r"async_scheduling=true: .*tree=true"):
        start(tiny_pair, engine_kwargs={"async_scheduling": True}, tree=True,
              tree_nodes=4)


@pytest.mark.parametrize("field,value", [
    ("rejection_sample_method", "synthetic"),
    ("num_speculative_tokens_per_batch_size", [[1, 4, 4]]),
])
def test_tree_mode_refuses_what_a_tree_cannot_honour(tiny_pair, field, value):
    with pytest.raises(SpecExtendConfigError,
                       match=rf"speculative_config\.{field}=.*: with tree=true"):
        start(tiny_pair, tree=True, tree_nodes=4, **{field: value})


def test_tree_too_wide_for_the_ancestor_masks(tiny_pair):
    with pytest.raises(SpecExtendConfigError, match=r"speculative_config\.tree_nodes=64"):
        start(tiny_pair, tree=True, tree_nodes=64)


@pytest.mark.parametrize("block_size_seen", [128, 16])
def test_blocks_fit_chunks_whenever_the_platform_sets_its_size(tiny_pair, block_size_seen):
    """vLLM 0.32's CPU build sets its block size (128) with the engine
    config; 0.33's later, in the executor (16 until then). Either way a
    retrieval engine gets the largest of the CPU's sizes dividing a chunk."""
    from types import SimpleNamespace

    from vllm_specextend.config import SpecExtendConfig
    from vllm_specextend.vllm_glue.engine_config import _fit_blocks_to_chunks

    draft = SimpleNamespace(model=tiny_pair.draft,
                            hf_config=SimpleNamespace(max_position_embeddings=2048))
    cache_config = SimpleNamespace(block_size=block_size_seen, user_specified_block_size=False)
    vllm_config = SimpleNamespace(
        cache_config=cache_config, model_config=SimpleNamespace(max_model_len=8192),
        speculative_config=SimpleNamespace(draft_model_config=draft, num_speculative_tokens=4))
    _fit_blocks_to_chunks(SpecExtendConfig(chunk_size=32), vllm_config)
    assert cache_config.block_size == 32 and cache_config.user_specified_block_size
