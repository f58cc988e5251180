"""The engine steps the policy learns its costs from.

An engine step runs the target (verifying the drafts of the round before)
and then a drafting round. A round's cost is its own time plus the next
target step's, which verifies its drafts; both are read once their end has
happened (`StepClock`: a step later on GPU, never by waiting). Only rounds
between two decode-only steps are priced: a prefill chunk in either step
would be counted as drafting. The same priced rounds, with each request's
tokens, measure which context drafts faster for requests that have the
choice (`context_choice`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_specextend.policy.speculation_policy import SpeculationPolicy
from vllm_specextend.policy.step_clock import StepClock


@dataclass
class TimedStep:
    """One engine step: when it began and ended, when its drafting round
    began and ended, the drafts the target verified (all requests), the
    round's length; whether every request was decoding."""

    began: object
    verified_drafts: int
    decode_only: bool
    round_began: object = None
    round_ended: object = None
    round_length: int = 0
    context_tokens: int = 0  # the batch's, summed over its requests
    caught_up: bool = False  # the round first read tokens of skipped rounds
    warmup: bool = False  # the round's lengths were the costs' warm-up's
    # Requests with a choice of context, and whether each drafted over a
    # working cache this round.
    contexts: tuple[list[str], np.ndarray] | None = None
    tokens: dict[str, int] | None = None  # what the step gained, per request that verified
    ended: object = None


class StepTimings:
    """Times every engine step and its drafting round; hands the policy each
    priced round's cost and, per request with a choice of context, what the
    round gained it."""

    def __init__(self, policy: SpeculationPolicy, clock: StepClock):
        self.policy = policy
        self.clock = clock
        self.step: TimedStep | None = None
        self.pending: list[TimedStep] = []
        # The last timed step, whose round the next step's target verifies.
        self.previous: tuple[TimedStep, float] | None = None

    def step_began(self, verified_drafts: int, decode_only: bool) -> None:
        self.step = TimedStep(self.clock.now(), verified_drafts, decode_only)

    def round_began(self, context_tokens: int) -> None:
        if self.step is not None:
            self.step.round_began = self.clock.now()
            self.step.context_tokens = context_tokens
            self.step.warmup = self.policy.latest_round_warmup

    def contexts_used(self, req_ids: list[str], used_working_cache: np.ndarray) -> None:
        if self.step is not None and req_ids:
            self.step.contexts = (req_ids, used_working_cache)

    def round_ended(self, round_length: int, caught_up: bool) -> None:
        if self.step is not None:
            self.step.round_ended, self.step.round_length = self.clock.now(), round_length
            self.step.caught_up = caught_up

    def step_ended(self, tokens: dict[str, int] | None) -> None:
        """The step is over; `tokens`: what it gained each request that
        verified drafts. Prices the rounds whose steps have ended."""
        if self.step is not None:
            self.step.tokens = tokens
            self.step.ended = self.clock.now()
            if self.step.round_ended is not None:
                self.pending.append(self.step)
            self.step = None
        while self.pending and self.clock.done(self.pending[0].ended):
            self._price(self.pending.pop(0))

    def _price(self, step: TimedStep) -> None:
        round_s = self.clock.seconds(step.round_began, step.round_ended)
        target_s = self.clock.seconds(step.began, step.ended) - round_s
        previous, self.previous = self.previous, (step, round_s)
        if previous is None or not (previous[0].decode_only and step.decode_only):
            return
        drafted, seconds = previous[0], previous[1] + target_s
        self.policy.observe_cost(drafted.round_length, step.verified_drafts, seconds,
                                 drafted.context_tokens, drafted.caught_up)
        self._observe_contexts(drafted, step.tokens or {}, seconds)

    def _observe_contexts(self, drafted: TimedStep, tokens: dict[str, int],
                          seconds: float) -> None:
        """What the round `drafted` gained each request with a choice of
        context that drafted in it (warm-up rounds force their lengths: no
        measure of either context)."""
        if drafted.contexts is None or drafted.warmup:
            return
        req_ids, used = drafted.contexts
        verified = [row for row, req_id in enumerate(req_ids) if req_id in tokens]
        if verified:
            self.policy.context.observe([req_ids[row] for row in verified], used[verified],
                                        np.array([tokens[req_ids[row]] for row in verified]),
                                        seconds)
