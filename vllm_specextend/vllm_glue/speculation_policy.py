"""The per-request speculation policy inside vLLM's V1 runner.

vLLM's proposers take the round's draft length as an argument
(`propose(num_speculative_tokens, ...)`, its dynamic speculation's hook:
with 0 the first pass still runs, so the draft's cache stays current).
Each drafting round the policy picks a length per request; the round runs
the longest, and the drafts handed to the scheduler are cut to each
request's pick, so vLLM verifies only those. What it learns from reaches
the host anyway: the scheduled drafts and the sampled tokens of every step.
Costs are timed here: a drafting round together with the target step that
verifies its drafts, by the wall clock on CPU (vLLM's CPU runner is
synchronous) and by CUDA events read a step later on GPU. The same timed
steps, with each request's tokens, measure which context (whole, or a
working cache) drafts faster for requests that have the choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from vllm_specextend.policy.speculation_policy import SpeculationPolicy
from vllm_specextend.policy.step_clock import StepClock

logger = logging.getLogger("vllm.specextend")


@dataclass
class _TimedStep:
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


class PolicyHooks:
    """The policy beside one proposer, and what the runner hooks feed it."""

    def __init__(self, max_drafts: int, max_requests: int, device: torch.device,
                 tensor_parallel: bool):
        self.policy = SpeculationPolicy(max_drafts, max_requests)
        self.clock = StepClock(device)
        self.tensor_parallel = tensor_parallel
        self.picks: dict[str, int] = {}
        self.scheduled_drafts: dict[str, int] = {}
        self.step: _TimedStep | None = None
        self.pending: list[_TimedStep] = []
        # The last timed step, whose round the next step's target verifies.
        self.previous: tuple[_TimedStep, float] | None = None
        logger.info(
            "SpecExtend: per-request speculation policy on: each request drafts 0 to %d "
            "tokens a round, from its acceptance by draft position and the measured "
            "costs of target steps and draft forwards (%d warm-up rounds; a request "
            "that stepped aside probes with one draft every %d rounds, waiting up to %d "
            "after failed probes)", max_drafts, self.policy.warmup_rounds,
            self.policy.probe_every, self.policy.max_probe_every)

    # engine step: execute_model ... sample_tokens (drafting round inside)
    def step_began(self, scheduler_output) -> None:
        spec = scheduler_output.scheduled_spec_decode_tokens
        self.scheduled_drafts = {req_id: len(ids) for req_id, ids in spec.items()}
        decode_only = all(count == 1 + self.scheduled_drafts.get(req_id, 0)
                          for req_id, count in scheduler_output.num_scheduled_tokens.items())
        self.step = _TimedStep(self.clock.now(), sum(self.scheduled_drafts.values()),
                               decode_only)

    def round_length(self, req_ids: list[str], decoding: np.ndarray, round_cap: int,
                     context_tokens: int) -> int:
        """Pick every request's draft length; the round runs the longest."""
        picks = self._from_rank_zero(self.policy.pick(req_ids, decoding, round_cap,
                                                      context_tokens))
        self.picks = dict(zip(req_ids, picks.tolist()))
        if self.step is not None:
            self.step.round_began = self.clock.now()
            self.step.context_tokens = context_tokens
            self.step.warmup = self.policy.latest_round_warmup
        return int(picks.max(initial=0))

    def wants_working_cache(self, req_ids: list[str]) -> np.ndarray:
        """Per request with a choice of context: draft over a working cache."""
        return self._from_rank_zero(self.policy.context.wants_working_cache(req_ids))

    def contexts_used(self, req_ids: list[str], used_working_cache: np.ndarray) -> None:
        if self.step is not None and req_ids:
            self.step.contexts = (req_ids, used_working_cache)

    def _from_rank_zero(self, decision: np.ndarray) -> np.ndarray:
        """Costs are timed per rank: every rank runs rank 0's decisions."""
        if not self.tensor_parallel:
            return decision
        from vllm.distributed import get_tp_group

        return get_tp_group().broadcast_object(decision, src=0)

    def round_ended(self, round_length: int, caught_up: bool = False) -> None:
        if self.step is not None:
            self.step.round_ended, self.step.round_length = self.clock.now(), round_length
            self.step.caught_up = caught_up

    def step_ended(self, output) -> None:
        """Learn from the step's verification; time the steps that have ended."""
        sampled = getattr(output, "sampled_token_ids", None)
        if sampled is not None and self.scheduled_drafts:
            # A request that sampled nothing (a prefill chunk) verified nothing.
            drafted = np.array([self.scheduled_drafts.get(req_id, 0) if ids else 0
                                for req_id, ids in zip(output.req_ids, sampled)])
            accepted = np.array([max(len(ids) - 1, 0) for ids in sampled])
            self.policy.observe_step(output.req_ids, drafted, accepted)
            if self.step is not None:
                self.step.tokens = {req_id: count + 1 for req_id, count, verified
                                    in zip(output.req_ids, accepted, drafted > 0) if verified}
        if self.step is not None:
            self.step.ended = self.clock.now()
            if self.step.round_ended is not None:
                self.pending.append(self.step)
            self.step = None
        self._read_timings()

    def _read_timings(self) -> None:
        """A round's cost is its own time and the next target step's, which
        verifies its drafts (the round ran inside the step before)."""
        while self.pending and self.clock.done(self.pending[0].ended):
            step = self.pending.pop(0)
            round_s = self.clock.seconds(step.round_began, step.round_ended)
            target_s = self.clock.seconds(step.began, step.ended) - round_s
            previous, self.previous = self.previous, (step, round_s)
            if previous is not None and previous[0].decode_only and step.decode_only:
                seconds = previous[1] + target_s
                self.policy.observe_cost(previous[0].round_length, step.verified_drafts,
                                         seconds, previous[0].context_tokens,
                                         previous[0].caught_up)
                self._observe_contexts(previous[0], step.tokens or {}, seconds)

    def _observe_contexts(self, drafted: _TimedStep, tokens: dict[str, int],
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

    def cut_to_picks(self, draft_token_ids):
        """The scheduler gets each request's drafts cut to its pick."""
        if draft_token_ids is None or not self.picks:
            return draft_token_ids
        draft_token_ids.draft_token_ids = [
            ids[: self.picks.get(req_id, len(ids))]
            for req_id, ids in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids)]
        return draft_token_ids

    def forget(self, req_id: str) -> None:
        self.policy.release(req_id)
        self.picks.pop(req_id, None)

    def state(self) -> dict:
        counters = self.policy.counters
        contexts = self.policy.context.counters
        costs = self.policy.current_costs()
        return {
            "policy_rounds": counters.rounds,
            "policy_warmup_rounds": counters.warmup_rounds,
            "policy_requests_drafting": counters.requests_drafting,
            "policy_requests_stepped_aside": counters.requests_stepped_aside,
            "policy_probes": counters.probes,
            "policy_drafts_picked": counters.drafts_picked,
            "policy_mean_pick": counters.mean_pick(),
            "policy_picks_by_length": counters.picks_by_length,
            "policy_latest_drafting": counters.latest_drafting,
            "policy_latest_stepped_aside": counters.latest_stepped_aside,
            "policy_held_requests": self.policy.held_requests(),
            "policy_context_rounds_whole_context": contexts.rounds_whole_context,
            "policy_context_rounds_working_cache": contexts.rounds_working_cache,
            "policy_context_trials": contexts.trials,
            "policy_context_kept_working_cache": contexts.kept_working_cache,
            "policy_context_held_requests": self.policy.context.held_requests(),
            "policy_costs_s": {"step_by_round_length": list(costs.step_by_round_length),
                               "per_verified_token": costs.per_verified_token},
        }
