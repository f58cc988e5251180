"""Which context the draft reads for a request that has the choice: its whole
context, as stock speculation does, or a Cross-model Retrieval working cache.

A request past the working cache's `retrieval_min_len` whose context the
draft's window still shows whole can draft over either. Neither wins
everywhere: the working cache's chunks, picked by the target's attention,
can be what the draft needs to predict the target (long documents) or
leave out what it needs (code whose definitions spread everywhere), and its
draft forwards read fewer keys but refill it now and then. So each request
measures both: tokens per second (its accepted drafts and the bonus token,
over the seconds of the drafting rounds and target steps that produced
them) over `trial_rounds` drafting rounds each, the engine's latest winner
first; keeps the faster; and re-checks the other every `recheck_every`
rounds, since what a text needs changes as it goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

WHOLE_CONTEXT, WORKING_CACHE = 0, 1


@dataclass
class ContextCounters:
    """Totals since start-up, for metrics."""

    # Requests with the choice that drafted over each context, summed over
    # the rounds measured (`observe`).
    rounds_whole_context: int = 0
    rounds_working_cache: int = 0
    trials: int = 0  # comparisons decided
    kept_working_cache: int = 0  # of them, won by the working cache


@dataclass
class _RequestContext:
    choice: int
    trial: bool = True  # measuring `choice` against the other
    rounds: int = 0  # rounds measured on `choice` since it was taken
    # Per context, decayed: tokens the request gained, seconds they cost.
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(2))
    seconds: np.ndarray = field(default_factory=lambda: np.zeros(2))


class ContextChoice:
    def __init__(self, trial_rounds: int = 6, recheck_every: int = 48, decay: float = 0.9):
        self.trial_rounds = trial_rounds
        self.recheck_every = recheck_every
        self.decay = decay
        self.requests: dict[str, _RequestContext] = {}
        # Decayed trials won per context, engine-wide: a new request tries
        # the latest winner first.
        self.wins = np.zeros(2)
        self.counters = ContextCounters()

    def wants_working_cache(self, req_ids: list[str]) -> np.ndarray:
        """Per request (each with the choice): draft over a working cache."""
        return np.array([self._of(req_id).choice == WORKING_CACHE for req_id in req_ids],
                        dtype=bool)

    def _of(self, req_id: str) -> _RequestContext:
        state = self.requests.get(req_id)
        if state is None:
            first = WHOLE_CONTEXT if self.wins[WHOLE_CONTEXT] > self.wins[WORKING_CACHE] \
                else WORKING_CACHE
            state = self.requests[req_id] = _RequestContext(first)
        return state

    def observe(self, req_ids: list[str], used_working_cache: np.ndarray, tokens: np.ndarray,
                seconds: float) -> None:
        """One drafting round and the target step that verified it: the
        context each request drafted over (a request may have wanted a
        working cache and found none free), the tokens each gained, the
        seconds the round and step took."""
        for req_id, used, gained in zip(req_ids, used_working_cache, tokens):
            state = self._of(req_id)
            context = int(used)
            if context == WORKING_CACHE:
                self.counters.rounds_working_cache += 1
            else:
                self.counters.rounds_whole_context += 1
            state.tokens[context] = state.tokens[context] * self.decay + gained
            state.seconds[context] = state.seconds[context] * self.decay + seconds
            if context != state.choice:
                continue
            state.rounds += 1
            if state.trial and state.rounds >= self.trial_rounds:
                if state.seconds[1 - context] > 0:
                    self._decide(state)
                else:
                    self._try_other(state)
            elif not state.trial and state.rounds >= self.recheck_every:
                self._try_other(state)

    def _try_other(self, state: _RequestContext) -> None:
        """Measure the other context afresh (what it measured before is stale)."""
        other = 1 - state.choice
        state.tokens[other] = state.seconds[other] = 0.0
        state.choice, state.trial, state.rounds = other, True, 0

    def _decide(self, state: _RequestContext) -> None:
        rates = state.tokens / np.maximum(state.seconds, 1e-12)
        winner = WORKING_CACHE if rates[WORKING_CACHE] > rates[WHOLE_CONTEXT] else WHOLE_CONTEXT
        self.wins = self.wins * self.decay
        self.wins[winner] += 1.0
        self.counters.trials += 1
        self.counters.kept_working_cache += winner == WORKING_CACHE
        state.choice, state.trial, state.rounds = winner, False, 0

    def release(self, req_id: str) -> None:
        self.requests.pop(req_id, None)

    def held_requests(self) -> int:
        return len(self.requests)
