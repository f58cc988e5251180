"""How many tokens each request drafts this round, for the most tokens per
second over the batch's step.

A step verifying k_i drafts of each request i yields sum_i E_i(k_i) tokens
(E from `acceptance.expected_tokens`) in `StepCosts.step_seconds(m, sum_i
k_i)` seconds, m = max_i k_i: the batch's draft forwards are shared, so the
round runs as many as the longest pick, and each further draft costs its
verification. For each round length m the ratio is maximised over k_i <= m
by Dinkelbach's iteration (each request's best k under the current rate);
the best m wins, if it beats not speculating at all by `min_gain`: costs
are measured with noise, and a gain inside it is no reason to start
drafting (on the tiny test pair one draft costs 2% of a step, about its
timing noise). The policy asks `MIN_GAIN` of a batch that stood aside and
less of one that drafts (`SpeculationPolicy`'s `keep_gain`).
Where the draft's cache is behind (rounds skipped while every request
stepped aside), a round that drafts first catches it up, one more draft
forward: that round's drafts must pay for it too.
"""

from __future__ import annotations

import numpy as np

from vllm_specextend.policy.costs import StepCosts

DINKELBACH_ITERATIONS = 6
MIN_GAIN = 0.03  # start speculating only where it is expected to be 3% faster


def best_draft_lengths(expected: np.ndarray, costs: StepCosts, max_round: int | None = None,
                       resume_seconds: float = 0.0,
                       min_gain: float = MIN_GAIN) -> tuple[np.ndarray, float]:
    """`expected`: [requests, max_drafts + 1]; `resume_seconds`: what a round
    that drafts costs first; `min_gain`: how much faster than not drafting
    the best round must be expected to be. Returns each request's draft
    length (at most `max_round`) and the step's expected tokens per second.
    Every round length iterates at once (a handful of array operations a
    round, not a Python loop over lengths)."""
    num_requests, width = expected.shape
    max_round = width - 1 if max_round is None else min(max_round, width - 1)
    lengths = np.arange(width)
    # [round lengths, 1, drafts]: which draft lengths each round length allows.
    allowed = (lengths[None, :] <= np.arange(max_round + 1)[:, None])[:, None, :]
    rates, picks = np.zeros(max_round + 1), None
    for _ in range(DINKELBACH_ITERATIONS):
        gain = expected[None] - (rates * costs.per_verified_token)[:, None, None] * lengths
        previous, picks = picks, np.where(allowed, gain, -np.inf).argmax(axis=2)
        if previous is not None and np.array_equal(picks, previous):
            break  # a fixed point: the same picks give the same rates
        rates = _tokens_per_second(expected, picks, costs, resume_seconds)
    best = 0  # a longer round length only where it beats the shorter ones past rounding
    for round_length in range(1, max_round + 1):
        if rates[round_length] > rates[best] + 1e-12:
            best = round_length
    without = float(rates[0])  # round length 0: nothing drafted, nothing to resume
    if best == 0 or rates[best] < without * (1 + min_gain):
        return np.zeros(num_requests, dtype=np.int64), without
    return picks[best], float(rates[best])


def _tokens_per_second(expected: np.ndarray, picks: np.ndarray, costs: StepCosts,
                       resume_seconds: float) -> np.ndarray:
    """Per row of `picks` ([round lengths, requests]): the step's tokens per
    second."""
    tokens = np.take_along_axis(expected[None], picks[..., None], axis=2)[..., 0].sum(axis=1)
    longest = picks.max(axis=1)
    seconds = (np.asarray(costs.step_by_round_length)[longest]
               + costs.per_verified_token * (picks.sum(axis=1) - longest)
               + resume_seconds * (longest > 0))
    return tokens / np.maximum(seconds, 1e-9)
