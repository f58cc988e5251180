"""The choice of context (whole, or a working cache) on synthetic rounds:
each request tries both, keeps the faster in tokens per second, re-checks
the other now and then; new requests try the engine's latest winner first."""

import numpy as np

from vllm_specextend.policy.context_choice import WHOLE_CONTEXT, WORKING_CACHE, ContextChoice
from vllm_specextend.policy.speculation_policy import SpeculationPolicy

TRIAL, RECHECK = 6, 48


def run(choice: ContextChoice, req_id: str, rounds: int, measure, free_caches: bool = True):
    """`rounds` drafting rounds of one request: `measure(context)` gives the
    tokens and seconds of a round over that context. Returns the contexts
    drafted over, round by round."""
    used = []
    for _ in range(rounds):
        wants = bool(choice.wants_working_cache([req_id])[0])
        context = WORKING_CACHE if wants and free_caches else WHOLE_CONTEXT
        tokens, seconds = measure(context)
        choice.observe([req_id], np.array([context == WORKING_CACHE]), np.array([tokens]),
                       seconds)
        used.append(context)
    return used


def noisy(rates: dict[int, tuple[float, float]], seed: int = 0):
    """Rounds whose tokens (1..5) and seconds scatter around the means given
    per context: (tokens, seconds)."""
    rng = np.random.default_rng(seed)

    def measure(context):
        tokens, seconds = rates[context]
        return (int(np.clip(round(rng.normal(tokens, 0.7)), 1, 5)),
                seconds * rng.uniform(0.9, 1.1))
    return measure


def test_tries_both_then_keeps_the_faster():
    """The working cache accepts less but each of its rounds is cheaper: what
    counts is tokens per second (3.5 / 0.70 s against 3.8 / 0.95 s)."""
    choice = ContextChoice(TRIAL, RECHECK)
    used = run(choice, "a", 2 * TRIAL + 20, noisy({WORKING_CACHE: (3.5, 0.70),
                                                   WHOLE_CONTEXT: (3.8, 0.95)}))
    assert used[:TRIAL] == [WORKING_CACHE] * TRIAL  # no winner yet: the cache first
    assert used[TRIAL:2 * TRIAL] == [WHOLE_CONTEXT] * TRIAL
    assert used[2 * TRIAL:] == [WORKING_CACHE] * 20
    assert (choice.counters.trials, choice.counters.kept_working_cache) == (1, 1)
    assert choice.counters.rounds_working_cache == TRIAL + 20


def test_a_cache_that_misses_what_the_draft_needs_is_dropped():
    choice = ContextChoice(TRIAL, RECHECK)
    used = run(choice, "a", 2 * TRIAL + 20, noisy({WORKING_CACHE: (1.6, 0.80),
                                                   WHOLE_CONTEXT: (3.8, 0.92)}))
    assert used[2 * TRIAL:] == [WHOLE_CONTEXT] * 20
    assert (choice.counters.trials, choice.counters.kept_working_cache) == (1, 0)
    # The next request tries the engine's latest winner first.
    assert not choice.wants_working_cache(["b"])[0]


def test_rechecks_the_other_and_follows_the_text():
    """Kept on its whole context, a request whose text later favours the
    working cache moves there at the next re-check, and not before."""
    choice = ContextChoice(TRIAL, RECHECK)
    whole_wins = noisy({WORKING_CACHE: (1.5, 0.8), WHOLE_CONTEXT: (4.0, 0.9)}, seed=1)
    cache_wins = noisy({WORKING_CACHE: (4.5, 0.8), WHOLE_CONTEXT: (2.0, 0.9)}, seed=2)
    run(choice, "a", 2 * TRIAL, whole_wins)
    later = run(choice, "a", RECHECK + TRIAL + 10, cache_wins)
    assert later[:RECHECK] == [WHOLE_CONTEXT] * RECHECK
    assert later[RECHECK:] == [WORKING_CACHE] * (TRIAL + 10)
    assert choice.counters.trials == 2 and choice.counters.kept_working_cache == 1


def test_rounds_without_a_free_cache_measure_the_whole_context():
    """A request that wants a working cache and finds none drafts whole: its
    rounds count for the whole context and its trial of the cache waits."""
    choice = ContextChoice(TRIAL, RECHECK)
    used = run(choice, "a", 10, noisy({WORKING_CACHE: (4.0, 0.8), WHOLE_CONTEXT: (3.0, 0.9)}),
               free_caches=False)
    assert used == [WHOLE_CONTEXT] * 10
    assert choice.wants_working_cache(["a"])[0] and choice.counters.trials == 0
    state = choice.requests["a"]
    assert state.rounds == 0 and state.seconds[WHOLE_CONTEXT] > 0


def test_a_finished_request_is_forgotten():
    policy = SpeculationPolicy(max_drafts=4, max_requests=4)
    policy.context.wants_working_cache(["a", "b"])
    policy.release("a")
    assert policy.context.held_requests() == 1 and "b" in policy.context.requests
