"""Exactness of the draft under CMR: for a fixed working set, vLLM's draft
(with the plugin's compact-position attention) gives the logits of a plain
transformers forward of the draft over the selected tokens concatenated, at
positions 0..n-1. The context (3,000 tokens) is longer than the draft's 2,048
positions, so only compact positions can make the two agree.

The draft here has one layer: its keys and values depend on the tokens
alone. In a deeper draft, the cached K/V of a selected token were computed
when that token attended to its own context (as in the SpecExtend reference,
which also reuses the draft's cache), so a fresh forward over the selected
tokens alone would differ from layer 2 on by design.

Tolerance: fp32 on both sides, logits of magnitude ~10; kernels differ in
summation order, so atol 2e-3, rtol 1e-3.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_engine
from vllm_specextend.retrieval.working_set import WorkingSets, working_set_positions

CONTEXT_LEN = 3000
CHUNK_SIZE = 32
KEPT_CHUNKS = [0, 5, 17, 40, 63]
WINDOW = 64


@pytest.fixture(scope="module")
def one_layer_draft(tiny_pair, tmp_path_factory):
    draft = AutoModelForCausalLM.from_pretrained(tiny_pair.draft, torch_dtype=torch.float32)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    folder = tmp_path_factory.mktemp("one_layer_draft")
    draft.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_pair.draft).save_pretrained(folder)
    return str(folder)


def test_draft_logits_match_transformers_on_selected_tokens(tiny_pair, one_layer_draft,
                                                            mixed_prompts, tmp_path):
    token_ids = (mixed_prompts[-1] * 2)[: CONTEXT_LEN + 1]
    num_chunks = CONTEXT_LEN // CHUNK_SIZE + 1
    kept = [index in KEPT_CHUNKS for index in range(num_chunks)]
    probe = {"token_ids": token_ids, "kept_chunks": kept,
             "window_start": CONTEXT_LEN - WINDOW, "chunk_size": CHUNK_SIZE}
    job = {"model": tiny_pair.target, "prompts": [token_ids[:50]], "max_tokens": 4,
           "speculative_config": {"method": "specextend", "model": one_layer_draft,
                                  "num_speculative_tokens": 4, "chunk_size": CHUNK_SIZE},
           "draft_probe": probe}
    result, _ = run_engine(job, tmp_path)
    vllm_logits = torch.tensor(result["draft_probe_logits"])

    sets = WorkingSets(torch.tensor(kept)[None], torch.tensor([CONTEXT_LEN - WINDOW]), CHUNK_SIZE)
    positions, count = working_set_positions(sets, torch.tensor([CONTEXT_LEN]), CONTEXT_LEN, 512)
    selected = positions[0, : int(count)].tolist()
    assert len(selected) == len(KEPT_CHUNKS) * CHUNK_SIZE + WINDOW
    concatenated = torch.tensor([[token_ids[p] for p in selected] + [token_ids[CONTEXT_LEN]]])
    draft = AutoModelForCausalLM.from_pretrained(one_layer_draft, torch_dtype=torch.float32)
    with torch.no_grad():
        expected = draft(concatenated).logits[0, -1]  # positions 0..n by default
    torch.testing.assert_close(vllm_logits, expected, atol=2e-3, rtol=1e-3)
    assert vllm_logits.argmax() == expected.argmax()
