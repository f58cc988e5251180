"""The per-request speculation policy: a state machine the drafting glue
feeds with what each step verified and what it cost, and asks, before each
drafting round, how many tokens every request drafts.

- Warm-up: the first rounds at a context length cycle the round length
  from 2 down to 0, twice, every request alike, so that the cost of not
  drafting, of drafting at all and of each further draft forward is
  measured there (`costs.CostsByContext`); longer rounds cost what these
  say per forward until a round runs them (a cost recheck, below, runs
  one). Rounds of the maximum length cost most where drafting pays least:
  on GovReport 8K (fp32, our CPUs) S(4) was 1.17 s against S(0) 0.43 s,
  and simulated on those costs a 100-step request whose drafts do not pay
  ran at 0.92x of the target alone warming up with lengths 4..0, 0.96x
  with 2..0 (`benchmarks/policy_simulation.py`).
- Then each round: `best_draft_lengths` over the decoding requests, from
  their acceptance by position and the measured costs.
- A request at 0 has stepped aside: its drafts cost more than they return.
  Its new tokens still reach the draft (the next round that runs the draft
  reads them: `stale_drafts`), so a round that drafts after rounds skipped
  first runs a catch-up forward: while the draft is behind, drafting must
  pay for that too (measured: `catch_up_seconds`), or a request at the
  break-even would step aside and back round after round, paying a
  catch-up each time. Now and then it drafts one token, a probe.
  A probe costs a round that runs the draft (S(1) against S(0): on long
  contexts nearly a second target step) for what its acceptance returns,
  so failed probes may take at most `probe_budget` of the time: the wait
  after one is twice the last wait up to `max_probe_every` rounds, and
  never shorter than what the budget allows, up to `longest_probe_wait`
  (a request's text may turn predictable however dear a probe is). In
  bf16 at 8K a probe costs about 1.5 target steps: waits capped at 32
  rounds let failed probes take 5% of the time. The first probe comes
  after `probe_every`: a request that stepped aside before it drafted
  did so on other requests' acceptance. An accepted probe brings the
  next one to the next round, so a request whose text turns predictable
  (copying, code) comes back within a few rounds of its first accepted
  probe.
- A margin both ways: a batch that stood aside in the round before
  drafts only where that is expected to be `MIN_GAIN` (3%) faster than
  not (costs and acceptance are measured with noise, and resuming costs
  a catch-up); one that drafts keeps drafting while it is expected to be
  `keep_gain` (0) faster. With 3% both ways, a request accepting 70-80%
  of its drafts where drafting pays 10-30% (bf16 at 8K on our CPUs)
  stepped aside on chance dips of its estimate, and aside it learns
  again only from one-token probes: in `benchmarks/policy_simulation.py`
  on those costs, 400 steps at acceptance 0.8 ran at 0.943x of stock
  speculation, 0.967x with the band (0.7-0.9: +0.1 to +2.4%; 0.3-0.6:
  within 0.3%; on fp32 GovReport 8K costs -0.9 to +0.6%).
- Acceptance is decayed by `acceptance_decay` a verified step (0.97:
  about 30 steps' memory; costs keep `decay`). At 0.9 (10 steps) the
  estimate of a request accepting 70-80% of its drafts swung by about
  0.2 with chance runs of misses, enough to set it aside, and a request
  aside learns again only from probes, one token each: in
  `benchmarks/policy_simulation.py` (bf16 costs at 8K) such requests sat
  aside for hundreds of rounds.
- Costs of round lengths longer than any pick go unmeasured, and what
  they were measured at (the first rounds, another context) may keep the
  policy from ever drafting further: after `recheck_every` steps without a
  measure of the length one past the longest pick, the request with the
  longest pick drafts one more token for a round (a cost recheck).
  The other way: a batch that drafts never measures S(0), and an S(0)
  measured high once (a slow step in the warm-up: 0.88 s where a step
  took 0.2 s, an EAGLE-3 head in bf16 at 8K) makes every round length
  look free. Unmeasured for `recheck_every` steps and no cheaper than a
  round that drafted, S(0) is measured again: a round that would draft
  stands aside (`MeasuredCosts.not_drafting_suspect`).
- Where a request may draft over its whole context or a working cache,
  which one: `context_choice`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vllm_specextend.policy.acceptance import AcceptanceByPosition, expected_tokens
from vllm_specextend.policy.context_choice import ContextChoice
from vllm_specextend.policy.costs import CostsByContext, MeasuredCosts, StepCosts
from vllm_specextend.policy.draft_lengths import MIN_GAIN, best_draft_lengths


@dataclass
class PolicyCounters:
    """Totals since start-up, for metrics: decoding requests per round,
    summed over rounds, split by what the policy picked."""

    rounds: int = 0
    warmup_rounds: int = 0
    requests_drafting: int = 0
    requests_stepped_aside: int = 0
    probes: int = 0
    cost_rechecks: int = 0
    drafts_picked: int = 0
    picks_by_length: list[int] = field(default_factory=list)
    # The latest round's decoding requests, drafting and stepped aside.
    latest_drafting: int = 0
    latest_stepped_aside: int = 0

    def add(self, picks: np.ndarray, probes: int, warmup: bool, max_drafts: int) -> None:
        if not self.picks_by_length:
            self.picks_by_length = [0] * (max_drafts + 1)
        self.rounds += 1
        self.warmup_rounds += warmup
        self.latest_drafting = int((picks > 0).sum())
        self.latest_stepped_aside = len(picks) - self.latest_drafting
        self.requests_drafting += self.latest_drafting
        self.requests_stepped_aside += self.latest_stepped_aside
        self.probes += probes
        self.drafts_picked += int(picks.sum())
        for length, count in enumerate(np.bincount(picks, minlength=max_drafts + 1)):
            self.picks_by_length[length] += int(count)

    def mean_pick(self) -> float:
        decided = self.requests_drafting + self.requests_stepped_aside
        return self.drafts_picked / decided if decided else 0.0


class SpeculationPolicy:
    def __init__(self, max_drafts: int, max_requests: int, decay: float = 0.9,
                 warmup_rounds: int | None = None, probe_every: int = 4,
                 max_probe_every: int = 32, probe_budget: float = 0.03,
                 recheck_every: int = 32, warmup_longest: int = 2,
                 longest_probe_wait: int = 128, acceptance_decay: float = 0.97,
                 keep_gain: float = 0.0):
        self.max_drafts = max_drafts
        self.keep_gain = keep_gain
        self.drafting = False  # whether the latest priced round drafted (probes aside)
        self.acceptance = AcceptanceByPosition(max_requests, max_drafts, acceptance_decay)
        self.warmup_longest = min(warmup_longest, max_drafts)
        self.warmup_rounds = (2 * (self.warmup_longest + 1) if warmup_rounds is None
                              else warmup_rounds)
        self.costs = CostsByContext(max_drafts, decay, self.warmup_rounds)
        self.latest_costs: MeasuredCosts | None = None
        self.probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.probe_budget = probe_budget
        self.longest_probe_wait = longest_probe_wait
        self.recheck_every = recheck_every
        self.decay = decay
        self.catch_up_seconds: float | None = None  # decayed mean, once measured
        self.rounds_aside: dict[str, int] = {}
        self.probe_wait: dict[str, int] = {}
        self.probing: set[str] = set()
        self.counters = PolicyCounters()
        self.context = ContextChoice(decay=decay)
        self.latest_round_warmup = False

    def pick(self, req_ids: list[str], decoding: np.ndarray, round_cap: int,
             context_tokens: int, draft_behind: bool = False) -> np.ndarray:
        """Draft lengths for this round's requests (the batch's context:
        `context_tokens`; `draft_behind`: a round that drafts first catches
        the draft up); 0 for those not decoding (a prefill chunk drafts
        nothing vLLM would schedule)."""
        cap = min(round_cap, self.max_drafts)
        slots = self.acceptance.slots(req_ids)
        costs = self.costs.warmed_up(context_tokens)
        warmup = costs is None
        probes = 0
        if cap == 0:
            picks = np.zeros(len(req_ids), dtype=np.int64)
        elif warmup:
            warming = self.costs.own(context_tokens)
            top = min(cap, self.warmup_longest)
            picks = np.full(len(req_ids), top - warming.warmup_rounds_done % (top + 1),
                            dtype=np.int64)
            warming.warmup_rounds_done += 1
            self.latest_costs = warming
        else:
            self.latest_costs = costs
            picks = np.zeros(len(req_ids), dtype=np.int64)
            if decoding.any():
                expected = expected_tokens(self.acceptance.rates(slots[decoding]))
                resume = (self.catch_up_seconds or 0.0) if draft_behind else 0.0
                picks[decoding], _ = best_draft_lengths(
                    expected, costs.current(), cap, resume_seconds=resume,
                    min_gain=self.keep_gain if self.drafting else MIN_GAIN)
            self.drafting = bool(picks.any())
            if self._recheck_not_drafting(picks, costs):
                picks = np.zeros_like(picks)  # no probes either: they would draft
            else:
                picks = self._recheck_cost(picks, costs, cap)  # not a probe's: one token
                picks, probes = self._probe(req_ids, picks, decoding)
        picks = np.where(decoding, picks, 0)
        self.latest_round_warmup = warmup
        self.counters.add(picks[decoding], probes, warmup, self.max_drafts)
        return picks

    def _recheck_not_drafting(self, picks: np.ndarray, costs: MeasuredCosts) -> bool:
        """Whether this round, which would draft, stands aside instead to
        measure S(0) again: unmeasured for `recheck_every` steps and no
        cheaper than drafting (`MeasuredCosts.not_drafting_suspect`)."""
        if not picks.any() or not costs.stale(0, self.recheck_every) or \
                not costs.not_drafting_suspect():
            return False
        costs.measuring(0)
        self.counters.cost_rechecks += 1
        return True

    def _recheck_cost(self, picks: np.ndarray, costs: MeasuredCosts, cap: int) -> np.ndarray:
        """One more draft for the request with the longest pick, when the
        round length one past it has gone unmeasured for `recheck_every`
        steps (at most one token: cheap when it does not pay)."""
        longest = int(picks.max(initial=0))
        if longest == 0 or longest >= cap or not costs.stale(longest + 1,
                                                               self.recheck_every):
            return picks
        costs.measuring(longest + 1)
        self.counters.cost_rechecks += 1
        picks = picks.copy()
        picks[int(np.argmax(picks))] = longest + 1
        return picks

    def _probe(self, req_ids: list[str], picks: np.ndarray,
               decoding: np.ndarray) -> tuple[np.ndarray, int]:
        """Requests aside long enough draft one token this round. A request's
        first probe comes `probe_every` rounds after it stepped aside: until
        it drafts, its acceptance is the engine's pooled rate, other
        requests' text."""
        probes = 0
        for row, req_id in enumerate(req_ids):
            if not decoding[row]:
                continue
            if picks[row] > 0:
                self.rounds_aside.pop(req_id, None)
                continue
            aside = self.rounds_aside.get(req_id, 0) + 1
            if aside >= self.probe_wait.setdefault(req_id, self.probe_every):
                picks[row], aside = 1, 0
                self.probing.add(req_id)
                probes += 1
            self.rounds_aside[req_id] = aside
        return picks, probes

    def observe_step(self, req_ids: list[str], drafted: np.ndarray,
                     accepted: np.ndarray) -> None:
        """What one verification step accepted of the drafts it scheduled."""
        verified = drafted > 0
        if not verified.any():
            return
        ids = [req_id for req_id, v in zip(req_ids, verified) if v]
        self.acceptance.observe(self.acceptance.slots(ids), drafted[verified],
                                accepted[verified])
        for req_id, hit in zip(ids, accepted[verified] > 0):
            if req_id in self.probing:
                self.probing.discard(req_id)
                wait = self.probe_wait.get(req_id, self.probe_every)
                self.probe_wait[req_id] = 1 if hit else max(
                    min(2 * wait, self.max_probe_every),
                    self._affordable_wait(self.current_costs()))

    def _affordable_wait(self, costs: StepCosts) -> int:
        """Rounds between failed probes for them to take at most
        `probe_budget` of the time: a probe round costs S(1) - S(0) more,
        and catching the draft up."""
        steps = costs.step_by_round_length
        extra = (max(steps[1] - steps[0], 0.0) + (self.catch_up_seconds or 0.0)) / max(
            steps[0], 1e-9)
        wait = int(np.ceil(extra / self.probe_budget))
        return int(np.clip(wait, self.probe_every, self.longest_probe_wait))

    def observe_cost(self, round_length: int, drafts: int, seconds: float,
                     context_tokens: int, caught_up: bool = False) -> None:
        """A drafting round of `round_length` over a batch of `context_tokens`
        and the target step that verified its `drafts` (all requests) took
        `seconds`. A round that
        first caught the draft up (after skipped rounds) costs more than
        drafting does round after round: what it cost beyond the measured
        round is kept apart, as the price of resuming (probes), so that it
        does not make drafting look dearer than it is."""
        costs = self.costs.priced_at(context_tokens)
        if not caught_up:
            costs.observe_step(round_length, drafts, seconds, context_tokens)
        elif costs.ready():
            extra = max(seconds - costs.current().step_seconds(round_length, drafts), 0.0)
            self.catch_up_seconds = (extra if self.catch_up_seconds is None else
                                     self.decay * self.catch_up_seconds
                                     + (1 - self.decay) * extra)

    def release(self, req_id: str) -> None:
        """The request finished: forget it."""
        self.acceptance.release(req_id)
        self.rounds_aside.pop(req_id, None)
        self.probe_wait.pop(req_id, None)
        self.probing.discard(req_id)
        self.context.release(req_id)

    def held_requests(self) -> int:
        return len(self.acceptance.slot_of)

    def state(self) -> dict:
        """The counters and costs, by the keys `metrics.METRICS` reads."""
        counters, contexts, costs = self.counters, self.context.counters, self.current_costs()
        return {
            "policy_rounds": counters.rounds,
            "policy_warmup_rounds": counters.warmup_rounds,
            "policy_requests_drafting": counters.requests_drafting,
            "policy_requests_stepped_aside": counters.requests_stepped_aside,
            "policy_probes": counters.probes,
            "policy_cost_rechecks": counters.cost_rechecks,
            "policy_drafts_picked": counters.drafts_picked,
            "policy_mean_pick": counters.mean_pick(),
            "policy_picks_by_length": list(counters.picks_by_length),  # a snapshot
            "policy_latest_drafting": counters.latest_drafting,
            "policy_latest_stepped_aside": counters.latest_stepped_aside,
            "policy_held_requests": self.held_requests(),
            "policy_context_rounds_whole_context": contexts.rounds_whole_context,
            "policy_context_rounds_working_cache": contexts.rounds_working_cache,
            "policy_context_trials": contexts.trials,
            "policy_context_kept_working_cache": contexts.kept_working_cache,
            "policy_context_held_requests": self.context.held_requests(),
            "policy_costs_s": {"step_by_round_length": list(costs.step_by_round_length),
                               "per_verified_token": costs.per_verified_token},
        }

    def current_costs(self) -> StepCosts:
        """The costs the latest round was priced at (or warmed up)."""
        if self.latest_costs is None:
            return StepCosts((0.0,) * (self.max_drafts + 1), 0.0)
        return self.latest_costs.current()
