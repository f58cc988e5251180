"""Sampling parameters behave with `specextend` as with the target alone, on
the chain and tree paths (vLLM's own sampler serves both): greedy requests
with penalties, allowed_token_ids, bad words, min_tokens, stop strings and
tokens, logprobs and prompt logprobs return what target-only returns;
seeded sampling (n = 1 and 2) returns a logprob entry for every token; a tree
engine refuses, naming it, each parameter a tree cannot serve."""

import pytest

from conftest import run_engine

NEW_TOKENS = 12
BASE = {"max_tokens": NEW_TOKENS, "ignore_eos": True}
GREEDY = [
    {"temperature": 0.0, "repetition_penalty": 1.3, "presence_penalty": 0.5,
     "frequency_penalty": 0.4},
    {"temperature": 0.0, "allowed_token_ids": list(range(60, 140))},
    {"temperature": 0.0, "bad_words": ["ab", "c"]},
    {"temperature": 0.0, "min_tokens": 6, "ignore_eos": False},
    {"temperature": 0.0, "logprobs": 3, "prompt_logprobs": 2},
]
SAMPLED = [{"temperature": 0.8, "top_p": 0.9, "seed": 7, "logprobs": 2},
           {"temperature": 1.0, "top_k": 5, "seed": 3, "n": 2, "logprobs": 0}]
# Path-dependent parameters a tree refuses (one request each).
TREE_REFUSED = {"presence_penalty": 0.5, "frequency_penalty": 0.3,
                "repetition_penalty": 1.2, "min_tokens": 3, "bad_words": ["ab"]}
CHAIN = {"num_speculative_tokens": 3}
TREE = {"tree": True, "tree_nodes": 6, "tree_max_depth": 3}


def stop_params(completion: dict) -> list[dict]:
    """A stop token and a stop string the target-only greedy output meets."""
    return [{"temperature": 0.0, "stop_token_ids": [completion["token_ids"][5]],
             "ignore_eos": False},
            {"temperature": 0.0, "stop": ["never in the text", completion["text"][6:8]],
             "ignore_eos": False}]


@pytest.fixture(scope="module")
def prompts(mixed_prompts):
    return [mixed_prompts[0][:60], mixed_prompts[1][:300]]


def job_for(tiny_pair, prompts, params, speculation=None):
    """Request i of the full list reads prompt i % 2, whichever requests run."""
    every = [repr(p) for p in GREEDY + SAMPLED]
    job = {"model": tiny_pair.target, "max_tokens": NEW_TOKENS,
           "prompts": [prompts[every.index(repr(p)) % len(prompts) if repr(p) in every else 0]
                       for p in params],
           "params": [{**BASE, **p} for p in params],
           # Seeded requests: keep prompts whole (vLLM rewinds a CPU generator
           # after a partial prefill, which CPU generators cannot do).
           "engine_kwargs": {"enable_chunked_prefill": False}}
    if speculation is not None:
        job["speculative_config"] = {"method": "specextend", "model": tiny_pair.draft,
                                     **speculation}
    return job


@pytest.fixture(scope="module")
def greedy_params(tiny_pair, prompts, tmp_path_factory):
    plain, _ = run_engine(job_for(tiny_pair, prompts, [{"temperature": 0.0}]),
                          tmp_path_factory.mktemp("plain"))
    return GREEDY + stop_params(plain["outputs"][0]["completions"][0])


@pytest.fixture(scope="module")
def target_only(tiny_pair, prompts, greedy_params, tmp_path_factory):
    result, _ = run_engine(job_for(tiny_pair, prompts, greedy_params + SAMPLED),
                           tmp_path_factory.mktemp("target_only"))
    return result


@pytest.fixture(scope="module", params=["chain", "tree"])
def speculative(request, tiny_pair, prompts, greedy_params, tmp_path_factory):
    speculation = CHAIN if request.param == "chain" else TREE
    params = greedy_params + SAMPLED
    if request.param == "tree":  # what a tree refuses is checked apart
        params = [p for p in params if not set(p) & set(TREE_REFUSED)]
    job = job_for(tiny_pair, prompts, params, speculation)
    if request.param == "tree":
        job["refused_params"] = [{**BASE, name: value} for name, value in TREE_REFUSED.items()]
    result, _ = run_engine(job, tmp_path_factory.mktemp(request.param))
    return request.param, params, result


def close_logprobs(expected, got):
    if expected is None:
        return got is None
    if got is None or len(expected) != len(got):
        return False
    for want, have in zip(expected, got):
        if (want is None) != (have is None):
            return False
        if want is not None and (want.keys() != have.keys() or any(
                abs(want[t] - have[t]) > 1e-3 for t in want)):
            return False
    return True


def test_greedy_requests_equal_target_only(speculative, target_only, greedy_params):
    path, params, result = speculative
    expected = {repr(p): out for p, out in zip(greedy_params + SAMPLED, target_only["outputs"])}
    for p, got in zip(params, result["outputs"]):
        if p["temperature"] != 0.0:
            continue
        want = expected[repr(p)]
        for want_completion, got_completion in zip(want["completions"], got["completions"]):
            assert got_completion["token_ids"] == want_completion["token_ids"], (path, p)
            assert got_completion["finish_reason"] == want_completion["finish_reason"], (path, p)
            assert close_logprobs(want_completion["logprobs"], got_completion["logprobs"]), (
                path, p)
        assert len(got["completions"]) == len(want["completions"])
        assert close_logprobs(want["prompt_logprobs"], got["prompt_logprobs"]), (path, p)


def test_sampled_requests_return_every_logprob(speculative):
    path, params, result = speculative
    for p, got in zip(params, result["outputs"]):
        if p["temperature"] == 0.0:
            continue
        assert len(got["completions"]) == p.get("n", 1)
        for completion in got["completions"]:
            assert len(completion["token_ids"]) == NEW_TOKENS
            assert len(completion["logprobs"]) == NEW_TOKENS, (path, p)
            for token, entry in zip(completion["token_ids"], completion["logprobs"]):
                assert str(token) in entry and len(entry) >= p["logprobs"]


def test_trees_refuse_what_only_chains_serve(speculative):
    path, params, result = speculative
    if path == "chain":  # chains serve every path-dependent parameter
        served = [p for p in params if set(p) & set(TREE_REFUSED)]
        assert len(served) == 3 and "refusals" not in result
        return
    assert len(result["refusals"]) == len(TREE_REFUSED)
    for (name, _), refusal in zip(TREE_REFUSED.items(), result["refusals"]):
        assert refusal is not None and f"{name}=" in refusal and "tree=true" in refusal
