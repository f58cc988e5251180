"""Cross-model Retrieval must find the chunk the next tokens depend on.

The model (tests/planted_span.py) continues a planted run s_0 s_1 ... only
while its context holds that run; it drafts for itself (same weights, 2,048
positions) over a working set of four chunks plus the recent window. The
prompts are longer than the draft's window and the run sits far from their
end, so the recency window of the same budget cannot see it: its drafts are
rejected, while CMR's (the target's attention points at the run's chunk)
are accepted. Both must stay lossless.

The first round after the prompt drafts before any working cache exists
(the draft's own prefill runs over its sliding window, as without
retrieval), so CMR's rate is about 1 - 1/rounds, not 1.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import planted_span
from conftest import run_engine

# (prompt length, where the run is planted): chunk-aligned so that the run
# lies in one chunk, past the first chunk (which recency always keeps).
PROMPTS = ((3000, 512), (4500, 1024), (6000, 2048))
MAX_TOKENS = planted_span.SPECIAL - 8  # stay inside the run: no wrap-around
BUDGET = {"chunk_size": 32, "top_k_chunks": 4, "recent_tokens": 64}


@pytest.fixture(scope="module")
def planted(tiny_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    target = planted_span.build(folder / "target", tiny_pair.target, max_positions=8192)
    draft = planted_span.build(folder / "draft", tiny_pair.target, max_positions=2048)
    prompts = [planted_span.prompt(length, at, seed=i)
               for i, (length, at) in enumerate(PROMPTS)]
    return target, draft, prompts


def _run(planted, selection, tmp_path_factory):
    target, draft, prompts = planted
    job = {"model": target, "prompts": prompts, "max_tokens": MAX_TOKENS,
           "max_model_len": 8192,
           "speculative_config": {"method": "specextend", "model": draft,
                                  "num_speculative_tokens": 4, "selection": selection,
                                  **BUDGET}}
    result, _ = run_engine(job, tmp_path_factory.mktemp(selection))
    counters = result["spec_decode"]
    accepted = (counters["vllm:spec_decode_num_accepted_tokens"]
                / counters["vllm:spec_decode_num_draft_tokens"])
    return result["token_ids"], accepted


def test_cmr_finds_the_planted_span_and_recency_does_not(planted, tmp_path_factory):
    target, _, prompts = planted
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    expected = [planted_span.special_token(i) for i in range(1, MAX_TOKENS + 1)]
    with torch.no_grad():  # the target itself continues the run
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS,
                                 do_sample=False)
            assert out[0, len(ids):].tolist() == expected

    cmr_ids, cmr_accepted = _run(planted, "cmr", tmp_path_factory)
    recency_ids, recency_accepted = _run(planted, "recency", tmp_path_factory)
    assert cmr_ids == [expected] * len(prompts)
    assert recency_ids == [expected] * len(prompts)
    # Four rounds a request, the first without a working cache.
    assert cmr_accepted >= 0.7, (cmr_accepted, recency_accepted)
    assert recency_accepted <= 0.1, (cmr_accepted, recency_accepted)
