"""The per-request speculation policy inside vLLM's V1 runner.

vLLM's proposers take the round's draft length as an argument
(`propose(num_speculative_tokens, ...)`, its dynamic speculation's hook:
with 0 the first pass still runs, so the draft's cache stays current).
Each drafting round the policy picks a length per request; the round runs
the longest, and the drafts handed to the scheduler are cut to each
request's pick, so vLLM verifies only those. What it learns from reaches
the host anyway: the scheduled drafts and the sampled tokens of every step.
Steps and rounds are timed by `policy.timed_steps`: by the wall clock on
CPU (vLLM's CPU runner is synchronous), by CUDA events read a step later
on GPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vllm_specextend.policy.speculation_policy import SpeculationPolicy
from vllm_specextend.policy.step_clock import StepClock
from vllm_specextend.policy.timed_steps import StepTimings

logger = logging.getLogger("vllm.specextend")


class PolicyHooks:
    """The policy beside one proposer, and what the runner hooks feed it."""

    def __init__(self, max_drafts: int, max_requests: int, device: torch.device,
                 tensor_parallel: bool):
        self.policy = SpeculationPolicy(max_drafts, max_requests)
        self.timings = StepTimings(self.policy, StepClock(device))
        self.tensor_parallel = tensor_parallel
        self.picks: dict[str, int] = {}
        # This round's rows with a choice of context, and whether each drafts
        # over a working cache (`round_length`).
        self.round_contexts = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
        self.scheduled_drafts: dict[str, int] = {}
        logger.info(
            "SpecExtend: per-request speculation policy on: each request drafts 0 to %d "
            "tokens a round, from its acceptance by draft position and the measured "
            "costs of target steps and draft forwards (%d warm-up rounds; a request "
            "that stepped aside probes with one draft every %d rounds, waiting up to %d "
            "after failed probes, longer where failed probes would take more than %.0f%% "
            "of the time)", max_drafts, self.policy.warmup_rounds,
            self.policy.probe_every, self.policy.max_probe_every,
            100 * self.policy.probe_budget)

    # engine step: execute_model ... sample_tokens (drafting round inside)
    def step_began(self, scheduler_output) -> None:
        spec = scheduler_output.scheduled_spec_decode_tokens
        self.scheduled_drafts = {req_id: len(ids) for req_id, ids in spec.items()}
        decode_only = all(count == 1 + self.scheduled_drafts.get(req_id, 0)
                          for req_id, count in scheduler_output.num_scheduled_tokens.items())
        self.timings.step_began(sum(self.scheduled_drafts.values()), decode_only)

    def round_length(self, req_ids: list[str], decoding: np.ndarray, round_cap: int,
                     context_tokens: int, draft_behind: bool, choosing: np.ndarray) -> int:
        """Pick every request's draft length, and the context of the rows in
        `choosing` (requests with a choice of context); the round runs the
        longest pick."""
        picks = self.policy.pick(req_ids, decoding, round_cap, context_tokens, draft_behind)
        wants = self.policy.context.wants_working_cache([req_ids[row] for row in choosing])
        picks, wants = self._from_rank_zero((picks, wants))
        self.round_contexts = (choosing, wants)
        self.picks = dict(zip(req_ids, picks.tolist()))
        self.timings.round_began(context_tokens)
        return int(picks.max(initial=0))

    def contexts_used(self, req_ids: list[str], used_working_cache: np.ndarray) -> None:
        self.timings.contexts_used(req_ids, used_working_cache)

    def _from_rank_zero(self, decisions: tuple) -> tuple:
        """Costs are timed per rank: every rank runs rank 0's decisions (one
        broadcast a round)."""
        if not self.tensor_parallel:
            return decisions
        from vllm.distributed import get_tp_group

        return get_tp_group().broadcast_object(decisions, src=0)

    def round_ended(self, round_length: int, caught_up: bool = False) -> None:
        self.timings.round_ended(round_length, caught_up)

    def step_ended(self, output) -> None:
        """Learn from the step's verification, and time it."""
        sampled = getattr(output, "sampled_token_ids", None)
        tokens = None
        if sampled is not None and self.scheduled_drafts:
            # A request that sampled nothing (a prefill chunk) verified nothing.
            drafted = np.array([self.scheduled_drafts.get(req_id, 0) if ids else 0
                                for req_id, ids in zip(output.req_ids, sampled)])
            accepted = np.array([max(len(ids) - 1, 0) for ids in sampled])
            self.policy.observe_step(output.req_ids, drafted, accepted)
            tokens = {req_id: count + 1 for req_id, count, verified
                      in zip(output.req_ids, accepted, drafted > 0) if verified}
        self.timings.step_ended(tokens)

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
