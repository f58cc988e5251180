"""Long outputs: a short prompt whose output outgrows the draft's 2,048
positions. Working caches are built over cached tokens, generated ones
included, so a draft with the target's own weights keeps accepting once the
request is past its window, where stock `draft_model` accepts nothing
there; an EAGLE-3 head of the same window keeps drafting over working
caches. Greedy output equals the target's alone throughout."""

import pytest

from conftest import run_engine
from vllm_specextend.models.eagle3 import build_random_eagle3_head

PROMPT_LEN = 200
MAX_NEW_TOKENS = 2600
DRAFT_WINDOW = 2048
# Output tokens once the request is 64 tokens past the draft's positions.
PAST_THE_WINDOW = DRAFT_WINDOW - PROMPT_LEN + 64


@pytest.fixture(scope="module")
def job(tiny_pair, mixed_prompts):
    return {"model": tiny_pair.target, "prompts": [mixed_prompts[1][:PROMPT_LEN]],
            "max_tokens": MAX_NEW_TOKENS, "counter_marks": [PAST_THE_WINDOW, MAX_NEW_TOKENS]}


@pytest.fixture(scope="module")
def target_only(job, tmp_path_factory):
    return run_engine(job, tmp_path_factory.mktemp("target_only"))[0]["token_ids"]


def past_the_window(result) -> dict:
    """vLLM's spec-decode counters over the output past the draft's window."""
    before, after = result["counters_along_output"]
    assert before["output_tokens"] >= PAST_THE_WINDOW
    return {name: after[name] - before[name] for name in after if name.startswith("vllm:")}


@pytest.mark.parametrize("method", ["specextend", "draft_model"])
def test_self_draft_past_its_window(job, target_only, short_window_self_draft, method,
                                    tmp_path):
    result, _ = run_engine({**job, "speculative_config": {
        "method": method, "model": short_window_self_draft, "num_speculative_tokens": 4}},
        tmp_path)
    assert result["token_ids"] == target_only
    accepted = past_the_window(result)["vllm:spec_decode_num_accepted_tokens"]
    if method == "specextend":
        assert accepted > 0
    else:  # stock vLLM drafts nothing it can use past the draft's positions
        assert accepted == 0


def test_eagle3_head_past_its_window(job, target_only, tiny_pair, tmp_path):
    head = build_random_eagle3_head(tiny_pair.target, tmp_path / "head", DRAFT_WINDOW)
    result, log = run_engine({**job, "speculative_config": {
        "method": "specextend", "model": head, "num_speculative_tokens": 3}},
        tmp_path / "specextend")
    assert result["token_ids"] == target_only
    assert past_the_window(result)["vllm:spec_decode_num_drafts"] > 0
    assert "first working caches filled (1 of 1 requests" in log
