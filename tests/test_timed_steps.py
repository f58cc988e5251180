"""The policy's step timing (`policy.timed_steps`) on a clock the test sets
(no vLLM): which rounds it prices, at what cost, and what it tells the
context choice."""

import numpy as np
import pytest

from vllm_specextend.policy.timed_steps import StepTimings


class SetClock:
    """A StepClock whose readings the test gives; GPU-like when `pending`
    holds stamps whose end has not happened yet."""

    def __init__(self):
        self.time = 0.0
        self.pending: set[float] = set()

    def now(self) -> float:
        return self.time

    def done(self, stamp: float) -> bool:
        return stamp not in self.pending

    def seconds(self, start: float, end: float) -> float:
        return end - start


class RecordingPolicy:
    """What `StepTimings` hands a `SpeculationPolicy`."""

    latest_round_warmup = False

    def __init__(self):
        self.costs: list[tuple] = []
        self.context = self
        self.contexts: list[tuple] = []

    def observe_cost(self, round_length, drafts, seconds, context_tokens, caught_up):
        self.costs.append((round_length, drafts, seconds, context_tokens, caught_up))

    def observe(self, req_ids, used, tokens, seconds):
        self.contexts.append((req_ids, used.tolist(), tokens.tolist(), seconds))


def run_step(timings, clock, *, verified, decode_only=True, round_length=2,
             target_s=0.5, round_s=0.25, tokens=None, contexts=None):
    timings.step_began(verified, decode_only)
    clock.time += target_s
    timings.round_began(context_tokens=1000)
    if contexts is not None:
        timings.contexts_used(*contexts)
    clock.time += round_s
    timings.round_ended(round_length, caught_up=False)
    timings.step_ended(tokens)


def test_a_round_costs_its_own_time_and_the_next_target_step():
    clock, policy = SetClock(), RecordingPolicy()
    timings = StepTimings(policy, clock)
    run_step(timings, clock, verified=0, round_length=3, round_s=0.25)
    assert policy.costs == []  # its drafts are verified in the next step
    run_step(timings, clock, verified=3, target_s=0.5)
    assert policy.costs == [(3, 3, pytest.approx(0.75), 1000, False)]


def test_rounds_next_to_a_prefill_step_are_not_priced():
    clock, policy = SetClock(), RecordingPolicy()
    timings = StepTimings(policy, clock)
    run_step(timings, clock, verified=0, decode_only=False)
    run_step(timings, clock, verified=2)
    run_step(timings, clock, verified=2, decode_only=False)
    assert policy.costs == []
    run_step(timings, clock, verified=2)
    run_step(timings, clock, verified=2)
    assert len(policy.costs) == 1


def test_a_step_is_priced_once_its_end_has_happened():
    clock, policy = SetClock(), RecordingPolicy()
    timings = StepTimings(policy, clock)
    run_step(timings, clock, verified=0)
    clock.pending.add(clock.time + 0.75)  # the next step's end, not yet reached
    run_step(timings, clock, verified=2)
    assert policy.costs == []
    clock.pending.clear()
    timings.step_ended(None)  # a later step reads it
    assert len(policy.costs) == 1


def test_the_context_choice_hears_what_each_verified_request_gained():
    clock, policy = SetClock(), RecordingPolicy()
    timings = StepTimings(policy, clock)
    run_step(timings, clock, verified=0,
             contexts=(["a", "b", "c"], np.array([True, False, True])))
    run_step(timings, clock, verified=4, tokens={"a": 3, "b": 2})
    [(req_ids, used, tokens, seconds)] = policy.contexts
    assert (req_ids, used, tokens) == (["a", "b"], [True, False], [3, 2])
    assert seconds == pytest.approx(0.75)


def test_warmup_rounds_measure_no_context():
    clock, policy = SetClock(), RecordingPolicy()
    timings = StepTimings(policy, clock)
    policy.latest_round_warmup = True
    run_step(timings, clock, verified=0, contexts=(["a"], np.array([True])))
    policy.latest_round_warmup = False
    run_step(timings, clock, verified=2, tokens={"a": 3})
    assert len(policy.costs) == 1 and policy.contexts == []
