"""The per-request speculation policy in a real vLLM engine (tiny pairs):
lossless with requests stepping aside beside requests drafting, stepping
aside from a draft that accepts nothing, and coming back, not stale, when
a request's text turns predictable."""

import pytest
import torch

from conftest import run_engine
from vllm_specextend.metrics import METRICS
from vllm_specextend.models.eagle3 import build_random_eagle3_head
from policy_drafts import (
    PHASED_MAX_TOKENS,
    accepting_nothing,
    failing_on,
    first_phase_length,
    phased_prompt,
)

CHAIN_DRAFT_TOKENS = 4
EAGLE_MAX_TOKENS = 160
# Added to each target forward of the phased runs: the tiny target as its
# own draft costs what the target does, so drafting 4 accepted tokens a
# step paid 7-25% there, within the timing noise of the policy's choice.
SLOW_TARGET_S = 0.01


@pytest.fixture(scope="module")
def prompts(mixed_prompts):
    """The phased prompt first, then the mixed batch's (past the draft's
    2,048 positions included)."""
    return [phased_prompt()] + mixed_prompts


@pytest.fixture(scope="module")
def target_only(tiny_pair, prompts, tmp_path_factory):
    job = {"model": tiny_pair.target, "prompts": prompts, "max_tokens": PHASED_MAX_TOKENS}
    result, _ = run_engine(job, tmp_path_factory.mktemp("target_only"))
    return result["token_ids"]


@pytest.fixture(scope="module")
def first_phase(target_only):
    """Length of the phased request's first phase (no token of it later)."""
    length = first_phase_length(target_only[0])
    assert 60 <= length <= PHASED_MAX_TOKENS - 120, length
    return length


@pytest.fixture(scope="module")
def phased_draft(tiny_pair, target_only, first_phase, tmp_path_factory):
    """The tiny draft (2,048 positions: the long prompts draft over working
    caches), failing wherever the target's next token is one of the phased
    request's first phase."""
    return failing_on(tiny_pair.draft, set(target_only[0][:first_phase]),
                      tmp_path_factory.mktemp("phased") / "draft")


@pytest.fixture(scope="module")
def phased_self_draft(tiny_pair, target_only, first_phase, tmp_path_factory):
    """The target as its own draft, failing the same way: past the first
    phase every draft is accepted (the runs slow the target's forward down,
    so that a draft forward costs less than a target step)."""
    return failing_on(tiny_pair.target, set(target_only[0][:first_phase]),
                      tmp_path_factory.mktemp("phased_self") / "draft")


def specextend_job(target, draft, prompts, **settings):
    return {"model": target, "prompts": prompts, "max_tokens": PHASED_MAX_TOKENS,
            "speculative_config": {"method": "specextend", "model": draft,
                                   "num_speculative_tokens": CHAIN_DRAFT_TOKENS, **settings},
            "request_state": True}


def test_mixed_batch_some_step_aside_lossless(tiny_pair, prompts, target_only, phased_draft,
                                              tmp_path):
    """The phased request steps aside while the others draft; every output
    equals the target alone's."""
    result, log = run_engine(specextend_job(tiny_pair.target, phased_draft, prompts), tmp_path)
    assert result["token_ids"] == target_only
    state = result["request_state"]
    assert state["policy_requests_stepped_aside"] > 0
    # Past warm-up (every request drafts there) the others still draft.
    assert state["policy_requests_drafting"] > 2 * state["policy_warmup_rounds"] * len(prompts)
    assert state["policy_held_requests"] == 0  # forgotten with vLLM's requests
    assert result["spec_decode"]["vllm:spec_decode_num_accepted_tokens"] > 0
    assert "per-request speculation policy on" in log
    assert state["refreshes"] > 0 and state["working_cache_request_rounds"] > 0
    # The same counts in vLLM's metrics (counted in the worker, read here).
    metrics = result["specextend_metrics"]
    for key, name, kind, _ in METRICS:
        # `LLM.get_metrics()` reads counters as whole numbers (refresh seconds).
        expected = int(state[key]) if kind == "counter" else state[key]
        assert metrics[f"vllm:specextend_{name}"] == expected, (name, metrics, state)
    picks = [metrics[f"vllm:specextend_policy_picks{{length={length}}}"]
             for length in range(CHAIN_DRAFT_TOKENS + 1)]
    assert picks == state["policy_picks_by_length"]


def test_steps_aside_from_a_draft_that_accepts_nothing(tiny_pair, prompts, target_only,
                                                       tmp_path):
    """After warm-up the engine drafts for a request in at most one step in
    five (vLLM's counters), and stays lossless. One request (2,500 tokens
    under the draft's 2,048 positions) drafts over a working cache: rounds
    are skipped all the same, and its cache refilled when it drafts again."""
    draft = accepting_nothing(tiny_pair.draft, tmp_path / "random_draft")
    rows = [0, 1, 4]
    batch = [prompts[row] for row in rows]
    result, _ = run_engine(specextend_job(tiny_pair.target, draft, batch), tmp_path / "run")
    assert result["token_ids"] == [target_only[row] for row in rows]
    counters, state = result["spec_decode"], result["request_state"]
    assert state["working_cache_request_rounds"] > 0
    assert counters["vllm:spec_decode_num_accepted_tokens"] <= 2
    # Nothing is accepted: each request takes one step per output token.
    request_steps = len(batch) * PHASED_MAX_TOKENS
    warmup_drafts = state["policy_warmup_rounds"] * len(batch)
    assert counters["vllm:spec_decode_num_drafts"] - warmup_drafts <= request_steps / 5
    assert state["policy_probes"] > 0
    # Rounds where all three stepped aside ran no draft forward.
    assert state["policy_rounds_skipped"] >= request_steps / len(batch) / 2, state
    assert state["policy_requests_behind"] == 0  # forgotten with vLLM's requests


@pytest.fixture(scope="module")
def eagle_runs(tiny_pair, prompts, tmp_path_factory):
    """A random EAGLE-3 head (it accepts nothing) on the 2,500-token prompt
    (past the head's 2,048 positions: it drafts over a working cache),
    policy on and off, recording what the head's cache got at each
    position."""
    head = build_random_eagle3_head(tiny_pair.target, tmp_path_factory.mktemp("eagle_head"),
                                    2048)
    runs = {}
    for adaptive in (True, False):
        job = specextend_job(tiny_pair.target, head, [prompts[4]], draft_method="eagle3",
                             adaptive=adaptive)
        job.update(max_tokens=EAGLE_MAX_TOKENS, record_draft_inputs=True)
        runs[adaptive], _ = run_engine(job, tmp_path_factory.mktemp(f"eagle_{adaptive}"))
    return runs


def test_an_eagle_head_skips_rounds_and_catches_up_exactly(eagle_runs, prompts):
    """Rounds skip the head; each skipped token's hidden state waits for the
    catch-up, which gives the head's cache at every position the same input
    as the rounds of the run with the policy off (at p: the token at p + 1
    and the target's hidden state at p)."""
    on, off = eagle_runs[True], eagle_runs[False]
    assert on["token_ids"] == off["token_ids"]
    state = on["request_state"]
    assert state["policy_rounds_skipped"] >= EAGLE_MAX_TOKENS / 2, state
    assert state["working_cache_request_rounds"] > 0
    assert state["policy_hidden_state_rings"] == 0  # freed with the request
    inputs_on, inputs_off = ({position: entry for position, *entry in run["draft_inputs"]}
                             for run in (on, off))
    caught_up = [position for position, (_, writer, _) in inputs_on.items()
                 if writer == "catch_up"]
    assert len(caught_up) >= EAGLE_MAX_TOKENS / 2
    prompt_len = len(prompts[4])
    last_verified = prompt_len + EAGLE_MAX_TOKENS - CHAIN_DRAFT_TOKENS - 2
    for position in range(prompt_len, min(max(caught_up) + 1, last_verified)):
        token_on, writer_on, hidden_on = inputs_on[position]
        token_off, writer_off, hidden_off = inputs_off[position]
        assert writer_on in ("first_pass", "catch_up") and writer_off == "first_pass", position
        assert token_on == token_off, position
        torch.testing.assert_close(torch.tensor(hidden_on), torch.tensor(hidden_off),
                                   rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def phased_runs(tiny_pair, prompts, first_phase, phased_self_draft, tmp_path_factory):
    """The phased request alone, policy on and off, with vLLM's counters at
    the end of its first phase, 64 tokens later (failed probes wait up to
    32 rounds: the first accepted one comes within them), and at the end."""
    marks = [first_phase, first_phase + 64, PHASED_MAX_TOKENS]
    runs = {}
    for adaptive in (True, False):
        job = specextend_job(tiny_pair.target, phased_self_draft, prompts[:1],
                             adaptive=adaptive)
        job["counter_marks"] = marks
        job["slow_target_s"] = SLOW_TARGET_S
        runs[adaptive], _ = run_engine(job, tmp_path_factory.mktemp(f"phased_{adaptive}"))
    return runs


def _between(snapshots, first: int, last: int) -> dict:
    """vLLM's counters over the output between two marks (-1: the start)."""
    def at(index, name):
        return snapshots[index][name] if index >= 0 else 0 * snapshots[last][name]

    counts = {name: snapshots[last][name] - at(first, name)
              for name in snapshots[last] if name.startswith("vllm:")}
    counts["tokens"] = snapshots[last]["output_tokens"] - (
        snapshots[first]["output_tokens"] if first >= 0 else 0)
    before = snapshots[first]["accepted_by_position"] if first >= 0 else []
    counts["accepted_first_draft"] = snapshots[last]["accepted_by_position"][0] - (
        before[0] if before else 0)
    return counts


def test_comes_back_not_stale(phased_runs, target_only):
    """Through the first phase the policy steps aside (its rounds skip the
    draft); once the text turns predictable it drafts again, and its drafts
    are accepted as often as the same request's with the policy off: the
    draft read the tokens of the rounds it skipped."""
    on, off = (phased_runs[a]["counters_along_output"] for a in (True, False))
    assert phased_runs[True]["request_state"]["policy_tokens_caught_up"] > 0
    assert phased_runs[True]["token_ids"][0] == target_only[0]
    assert phased_runs[False]["token_ids"][0] == target_only[0]
    first_on, first_off = _between(on, -1, 0), _between(off, -1, 0)
    assert first_off["vllm:spec_decode_num_drafts"] >= first_off["tokens"] - 1
    assert first_on["vllm:spec_decode_num_draft_tokens"] <= (
        first_off["vllm:spec_decode_num_draft_tokens"] / 10)
    later_on, later_off = _between(on, 1, 2), _between(off, 1, 2)
    steps_on = later_on["tokens"] - later_on["vllm:spec_decode_num_accepted_tokens"]
    assert later_on["vllm:spec_decode_num_drafts"] >= 0.8 * steps_on, later_on
    hits = {name: run["vllm:spec_decode_num_accepted_tokens"]
            / run["vllm:spec_decode_num_draft_tokens"]
            for name, run in (("on", later_on), ("off", later_off))}
    assert hits["off"] >= 0.9, hits  # the phase is predictable
    assert hits["on"] >= 0.95 * hits["off"], hits


def test_requests_with_a_choice_of_context_try_both_lossless(tiny_pair, prompts, target_only,
                                                             short_window_self_draft, tmp_path):
    """A working cache of 1,024 positions under the draft's 2,048: the
    1,500-token request may draft over its whole context or a working cache
    and measures both, beside requests past 2,048 that must draft over
    working caches and short ones that draft whole; every output equals
    the target alone's."""
    job = specextend_job(tiny_pair.target, short_window_self_draft, prompts,
                         working_cache_window=1024)
    result, log = run_engine(job, tmp_path)
    assert result["token_ids"] == target_only
    state = result["request_state"]
    assert state["policy_context_trials"] >= 1, state
    assert state["policy_context_rounds_whole_context"] > 0
    assert state["policy_context_rounds_working_cache"] > 0
    assert state["policy_context_held_requests"] == 0  # forgotten with vLLM's requests
    assert "contexts of 1001 to 2024 tokens may draft whole or over a working cache" in log
