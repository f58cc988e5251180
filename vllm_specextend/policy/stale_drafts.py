"""Which requests' draft caches miss tokens because drafting rounds were
skipped, and from which position.

A round in which every request stepped aside need not run the draft at
all: vLLM's first pass (the draft reading the step's new tokens so that
its cache stays current) costs about a draft forward over the whole
context, for nothing drafted. Skipped rounds leave the draft's cache
behind; the next round that runs the draft first reads the missed tokens
(one forward over all of them, a short prefill), so a request that comes
back drafts over its whole context (no stale cache, TensorRT-LLM's trap).

Positions: a request with `computed` tokens in the target's cache before
a step, whose first pass ran in every round so far, has a draft model's
cache current through position `computed` (the token sampled a step
earlier, written as the first pass's last input): skipping this round
leaves it missing everything from `computed + 1` on. An EAGLE head's first
pass writes position p from the token at p + 1 (and the target's hidden
state at p): its cache ends one position earlier, at `computed - 1`, and a
skip misses from `computed` on (`cached_past_computed` 0, not 1).
"""

from __future__ import annotations

import numpy as np


class StaleDrafts:
    def __init__(self, max_missing: int, cached_past_computed: int = 1):
        # The most tokens a request may miss; bounds the catch-up's buffers.
        self.max_missing = max_missing
        self.cached_past_computed = cached_past_computed
        self.missing_from: dict[str, int] = {}
        self.rounds_skipped = 0
        self.tokens_caught_up = 0
        self.catch_ups = 0  # rounds that first read missed tokens

    def _first_missing(self, req_ids: list[str], computed: np.ndarray) -> np.ndarray:
        return np.array([self.missing_from.get(req_id, count + self.cached_past_computed)
                         for req_id, count in zip(req_ids, computed)], dtype=np.int64)

    def behind(self, req_ids: list[str], computed: np.ndarray) -> bool:
        """Whether a round that runs the draft now must first read missed
        tokens (`take` would return rows): for a draft model, one skipped
        round misses nothing the next first pass does not read."""
        return bool((self._first_missing(req_ids, computed) < computed).any())

    def can_skip(self, req_ids: list[str], computed: np.ndarray,
                 scheduled: np.ndarray) -> bool:
        """Whether skipping this round keeps every request within
        `max_missing` tokens at the next round (its context then ends
        before `computed + scheduled` at the latest)."""
        missing_next = computed + scheduled - self._first_missing(req_ids, computed)
        return bool((missing_next <= self.max_missing).all())

    def skip(self, req_ids: list[str], computed: np.ndarray) -> None:
        for req_id, first in zip(req_ids, self._first_missing(req_ids, computed)):
            self.missing_from[req_id] = int(first)
        self.rounds_skipped += 1

    def take(self, req_ids: list[str], computed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows whose draft must read tokens before this round's forward,
        and each one's first missing position (it reads up to `computed`,
        exclusive: the step's own tokens are the first pass's). A request
        whose target cache went back (preempted, recomputed from its
        prompt) has its draft cache rebuilt by that prefill: nothing to
        read."""
        rows, firsts = [], []
        for row, (req_id, count) in enumerate(zip(req_ids, computed)):
            first = self.missing_from.pop(req_id, None)
            if first is not None and first < count:
                rows.append(row)
                firsts.append(first)
        rows, firsts = np.array(rows, dtype=np.int64), np.array(firsts, dtype=np.int64)
        self.tokens_caught_up += int((computed[rows] - firsts).sum())
        self.catch_ups += bool(len(rows))
        return rows, firsts

    def forget(self, req_id: str) -> None:
        self.missing_from.pop(req_id, None)

    def held_requests(self) -> int:
        return len(self.missing_from)
