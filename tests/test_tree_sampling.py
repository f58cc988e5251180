"""Speculative sampling keeps the target's distribution: tree mode, chain
mode, chains from an EAGLE-3 head and the target alone, each on many seeded
requests of one prompt, against the exact distribution of the first three
tokens. Top-k = 2 leaves 8 outcomes; temperature 1 leaves them skewed
(0.01 to 0.62), so a sampler that leans to the draft's or the target's
favourite token shows."""

import random

import pytest
import torch
from scipy.stats import chisquare

from conftest import run_engine
from vllm_specextend.models.eagle3 import build_random_eagle3_head

TEMPERATURE, TOP_K, NEW_TOKENS, SAMPLES = 1.0, 2, 3, 1000
# Fails a correct sampler with probability 1e-3 (seeds are fixed, so a run
# either passes always or fails always).
SIGNIFICANCE = 1e-3


@pytest.fixture(scope="module")
def prompt():
    rng = random.Random(1)
    return [rng.randrange(3, 259) for _ in range(24)]


@pytest.fixture(scope="module")
def exact_distribution(tiny_pair, prompt):
    """P(t1, t2, t3) of the target under temperature and top-k, from
    transformers (vLLM samples from softmax(top-k(logits / T)))."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_pair.target, torch_dtype=torch.float64).eval()

    @torch.no_grad()
    def next_token(ids):
        logits = model(torch.tensor([ids])).logits[0, -1] / TEMPERATURE
        top = logits.topk(TOP_K)
        return dict(zip(top.indices.tolist(), top.values.softmax(0).tolist()))

    joint = {(): 1.0}
    for _ in range(NEW_TOKENS):
        joint = {path + (token,): p * q for path, p in joint.items()
                 for token, q in next_token(prompt + list(path)).items()}
    assert abs(sum(joint.values()) - 1) < 1e-9
    return joint


SPECULATION = {
    "target only": None,
    "chain": {"num_speculative_tokens": 2},
    "tree": {"tree": True, "tree_nodes": 8, "tree_max_depth": 3},
    # A random head: its drafts are nearly always rejected, so the target's
    # own draw after each rejection carries the distribution.
    "eagle3 head": {"num_speculative_tokens": 2, "draft_method": "eagle3"},
}


@pytest.fixture(scope="module", params=list(SPECULATION))
def sampled(request, tiny_pair, prompt, tmp_path_factory):
    job = {"model": tiny_pair.target, "prompts": [prompt] * SAMPLES, "max_tokens": NEW_TOKENS,
           "sampling": {"temperature": TEMPERATURE, "top_k": TOP_K},
           # vLLM 0.32's runner rewinds a seeded request's generator when it
           # discards a partial prefill's sample, which CPU generators cannot
           # do ("CPU Generator does not use offset"): keep prompts whole.
           "engine_kwargs": {"enable_chunked_prefill": False, "max_num_seqs": 64}}
    speculation = SPECULATION[request.param]
    if speculation is not None:
        draft = tiny_pair.draft
        if speculation.get("draft_method") == "eagle3":
            draft = build_random_eagle3_head(tiny_pair.target,
                                             tmp_path_factory.mktemp("head"), 2048)
        job["speculative_config"] = {"method": "specextend", "model": draft, **speculation}
    result, _ = run_engine(job, tmp_path_factory.mktemp("sampling"))
    return request.param, result


def test_first_tokens_follow_the_target_distribution(sampled, exact_distribution):
    name, result = sampled
    outcomes = list(exact_distribution)
    counts = {outcome: 0 for outcome in outcomes}
    for tokens in result["token_ids"]:
        assert tuple(tokens) in counts, f"{name}: {tokens} is outside the target's top-{TOP_K}"
        counts[tuple(tokens)] += 1
    expected = [exact_distribution[o] * SAMPLES for o in outcomes]
    assert min(expected) >= 5, "too few samples for a chi-square test"
    observed = [counts[o] for o in outcomes]
    test = chisquare(observed, expected)
    assert test.pvalue > SIGNIFICANCE, (
        f"{name}: observed {observed} vs expected {[round(e) for e in expected]}, "
        f"p = {test.pvalue:.2g}")
    counters = result["spec_decode"]
    if name == "eagle3 head":
        assert counters["vllm:spec_decode_num_drafts"] > SAMPLES
    elif name != "target only":
        assert counters["vllm:spec_decode_num_accepted_tokens"] > SAMPLES // 10

