"""Exactness of the draft under CMR, through the engine's own draft:

- after a refresh fills a working cache, its keys are the selected tokens'
  keys rotated at compact positions 0..n-1 (expected: transformers' k_proj
  of those tokens, rotated here with its own RoPE);
- decoding through that working cache runs vLLM's attention kernel over it
  (not a fallback), and gives the logits of a plain transformers forward of
  the draft over the selected tokens concatenated, at positions 0..n.

The selected positions are written out here from the chunk indices and the
window, independently of the plugin. The context (3,000 tokens) is longer
than the draft's 2,048 positions, so only compact positions make the two
agree.

The draft has one layer: its keys and values depend on the tokens alone. In
a deeper draft the cached K/V of a selected token were computed when that
token attended to its own context (as in the SpecExtend reference), so a
fresh forward over the selected tokens alone would differ from layer 2 on
by design.

Tolerance: fp32 on both sides, kernels differ in summation order and the
cache's keys were rotated at their true positions (up to 3,000) before
moving: logits of magnitude ~10 to atol 2e-3, keys to 1e-4.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import run_engine

CONTEXT_LEN = 3000
CHUNK_SIZE = 32
RECENT_TOKENS = 64
KEPT_CHUNKS = [0, 5, 17, 40, 63]


@pytest.fixture(scope="module")
def one_layer_draft(tiny_pair, tmp_path_factory):
    draft = AutoModelForCausalLM.from_pretrained(tiny_pair.draft, torch_dtype=torch.float32)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    folder = tmp_path_factory.mktemp("one_layer_draft")
    draft.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_pair.draft).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def probed(tiny_pair, one_layer_draft, mixed_prompts, tmp_path_factory):
    token_ids = (mixed_prompts[-1] * 2)[: CONTEXT_LEN + 1]
    job = {"model": tiny_pair.target, "prompts": [token_ids[:50]], "max_tokens": 4,
           "speculative_config": {"method": "specextend", "model": one_layer_draft,
                                  "num_speculative_tokens": 4, "chunk_size": CHUNK_SIZE,
                                  "recent_tokens": RECENT_TOKENS,
                                  "top_k_chunks": len(KEPT_CHUNKS)},
           "draft_probe": {"token_ids": token_ids, "kept_chunks": KEPT_CHUNKS}}
    result, _ = run_engine(job, tmp_path_factory.mktemp("draft_probe"))
    # The window starts at the chunk boundary RECENT_TOKENS before the end.
    window_start = (CONTEXT_LEN - RECENT_TOKENS) // CHUNK_SIZE * CHUNK_SIZE
    selected = [chunk * CHUNK_SIZE + i for chunk in KEPT_CHUNKS for i in range(CHUNK_SIZE)]
    selected += list(range(window_start, CONTEXT_LEN))
    draft = AutoModelForCausalLM.from_pretrained(one_layer_draft, torch_dtype=torch.float32)
    return result["draft_probe"], token_ids, selected, draft


def test_working_cache_keys_are_the_selected_keys_at_compact_positions(probed):
    probe, token_ids, selected, draft = probed
    compact_keys = torch.tensor(probe["compact_keys"])
    assert compact_keys.shape[0] == len(selected)
    config = draft.config
    head_dim = config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        hidden = draft.model.layers[0].input_layernorm(
            draft.model.embed_tokens(torch.tensor([[token_ids[p] for p in selected]])))
        keys = draft.model.layers[0].self_attn.k_proj(hidden).view(
            1, len(selected), config.num_key_value_heads, head_dim).transpose(1, 2)
        cos, sin = draft.model.rotary_emb(keys, torch.arange(len(selected))[None])
        expected, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
    torch.testing.assert_close(compact_keys, expected[0].transpose(0, 1), atol=1e-4, rtol=1e-4)


def test_decode_runs_vllms_kernel_over_the_working_cache(probed):
    probe, _, _, _ = probed
    assert probe["kernel_calls"] == 1  # one draft layer, one decode forward
    assert probe["working_cache_reads"] == 1


def test_draft_logits_match_transformers_on_selected_tokens(probed):
    probe, token_ids, selected, draft = probed
    concatenated = torch.tensor([[token_ids[p] for p in selected] + [token_ids[CONTEXT_LEN]]])
    with torch.no_grad():
        expected = draft(concatenated).logits[0, -1]  # positions 0..n by default
    logits = torch.tensor(probe["logits"])
    torch.testing.assert_close(logits, expected, atol=2e-3, rtol=1e-3)
    assert logits.argmax() == expected.argmax()
