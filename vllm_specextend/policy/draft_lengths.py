"""How many tokens each request drafts this round, for the most tokens per
second over the batch's step.

A step verifying k_i drafts of each request i yields sum_i E_i(k_i) tokens
(E from `acceptance.expected_tokens`) in `StepCosts.step_seconds(m, sum_i
k_i)` seconds, m = max_i k_i: the batch's draft forwards are shared, so the
round runs as many as the longest pick, and each further draft costs its
verification. For each round length m the ratio is maximised over k_i <= m
by Dinkelbach's iteration (each request's best k under the current rate);
the best m wins, if it beats not speculating at all by `MIN_GAIN`: costs
are measured with noise, and a gain inside it is no reason to draft (on
the tiny test pair one draft costs 2% of a step, about its timing noise).
Where the draft's cache is behind (rounds skipped while every request
stepped aside), a round that drafts first catches it up, one more draft
forward: that round's drafts must pay for it too.
"""

from __future__ import annotations

import numpy as np

from vllm_specextend.policy.costs import StepCosts

DINKELBACH_ITERATIONS = 6
MIN_GAIN = 0.03  # speculate only where it is expected to be 3% faster than not


def best_draft_lengths(expected: np.ndarray, costs: StepCosts, max_round: int | None = None,
                       resume_seconds: float = 0.0) -> tuple[np.ndarray, float]:
    """`expected`: [requests, max_drafts + 1]; `resume_seconds`: what a round
    that drafts costs first. Returns each request's draft length (at most
    `max_round`) and the step's expected tokens per second."""
    num_requests, width = expected.shape
    max_round = width - 1 if max_round is None else min(max_round, width - 1)
    lengths = np.arange(width)
    best_picks, best_rate = np.zeros(num_requests, dtype=np.int64), -1.0
    for round_length in range(max_round + 1):
        allowed = lengths[None, :] <= round_length
        rate = 0.0
        for _ in range(DINKELBACH_ITERATIONS):
            gain = expected - rate * costs.per_verified_token * lengths[None, :]
            picks = np.where(allowed, gain, -np.inf).argmax(axis=1)
            rate = _tokens_per_second(expected, picks, costs, resume_seconds)
        if rate > best_rate + 1e-12:
            best_picks, best_rate = picks, rate
    without = _tokens_per_second(expected, np.zeros(num_requests, dtype=np.int64), costs)
    if best_rate < without * (1 + MIN_GAIN):
        return np.zeros(num_requests, dtype=np.int64), without
    return best_picks, best_rate


def _tokens_per_second(expected: np.ndarray, picks: np.ndarray, costs: StepCosts,
                       resume_seconds: float = 0.0) -> float:
    tokens = expected[np.arange(len(picks)), picks].sum()
    round_length = int(picks.max(initial=0))
    seconds = (costs.step_seconds(round_length, int(picks.sum()))
               + resume_seconds * (round_length > 0))
    return float(tokens / max(seconds, 1e-9))
