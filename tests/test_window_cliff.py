"""The window cliff: a draft with the target's own weights but 2,048
positions. Stock vLLM 0.32 drafts dummies (accepts nothing) for a request
longer than that; with specextend the draft attends over a working cache at
compact positions, so a 5,000-token request accepts drafted tokens and stays
lossless."""

from conftest import run_engine

PROMPT_LEN = 5000
MAX_NEW_TOKENS = 24


def test_long_request_accepts_and_is_lossless(tiny_pair, short_window_self_draft, mixed_prompts,
                                              tmp_path):
    prompt = (mixed_prompts[-1] * 2)[:PROMPT_LEN]
    job = {"model": tiny_pair.target, "prompts": [prompt], "max_tokens": MAX_NEW_TOKENS,
           "max_model_len": 8192}
    target_only, _ = run_engine(job, tmp_path / "target_only")
    speculative_config = {"method": "specextend", "model": short_window_self_draft,
                          "num_speculative_tokens": 4}
    result, log = run_engine({**job, "speculative_config": speculative_config},
                             tmp_path / "specextend")
    assert result["token_ids"] == target_only["token_ids"]
    assert result["spec_decode"]["vllm:spec_decode_num_accepted_tokens"] > 0
    assert "first working caches filled (1 of 1 requests" in log
