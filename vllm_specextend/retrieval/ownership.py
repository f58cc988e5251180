"""Which request holds which working cache, and when each is refilled.

A fixed number of working caches is allocated at start-up. A request past
`retrieval_min_len` that is decoding takes a free one, filled in the
round it takes it, then again every `refresh_every` drafting rounds, and
in the first round that drafts after one that ran no draft forward (the
speculation policy's skipped rounds: the cache lacks their tokens).
Requests beyond the caches keep drafting over their sliding window. A
cache is freed when its request leaves the batch, finishes, or restarts
from fewer computed tokens than it had when its cache was filled (vLLM
recomputes a preempted request from its prompt). Host-side bookkeeping
over vLLM's host copies of the batch: no tensors, no device.
"""

from __future__ import annotations

import numpy as np

NO_CACHE = -1
# A cache's fill round that makes it due in any round.
STALE = np.iinfo(np.int64).min // 2


class WorkingCacheOwners:
    def __init__(self, num_caches: int):
        self.num_caches = num_caches
        self.holder: dict[str, int] = {}  # request id -> cache index
        # Per cache: the request's computed tokens when it was filled, and
        # the drafting round it was filled in.
        self.filled_at = np.zeros(num_caches, dtype=np.int64)
        self.filled_round = np.zeros(num_caches, dtype=np.int64)

    def keep_holders(self, req_ids: list[str], computed: np.ndarray) -> None:
        """Free the caches of requests that left the batch or restarted."""
        present = dict(zip(req_ids, computed))
        for req_id, cache in list(self.holder.items()):
            if req_id not in present or present[req_id] < self.filled_at[cache]:
                del self.holder[req_id]

    def release(self, req_id: str) -> None:
        self.holder.pop(req_id, None)

    def due_rows(self, req_ids: list[str], eligible: np.ndarray, computed: np.ndarray,
                 round_index: int, refresh_every: int) -> np.ndarray:
        """Rows whose cache is (re)filled this round: eligible requests that
        just got a cache, and holders filled `refresh_every` rounds ago."""
        free = sorted(set(range(self.num_caches)) - set(self.holder.values()))
        due = []
        for row in np.flatnonzero(eligible):
            cache = self.holder.get(req_ids[row])
            if cache is None:
                if not free:
                    continue
                cache = self.holder[req_ids[row]] = free.pop(0)
            elif round_index - self.filled_round[cache] < refresh_every:
                continue
            self.filled_at[cache], self.filled_round[cache] = computed[row], round_index
            due.append(row)
        return np.array(due, dtype=np.int64)

    def caches_of(self, req_ids: list[str]) -> np.ndarray:
        """Each request's cache index, NO_CACHE for none."""
        return np.array([self.holder.get(req_id, NO_CACHE) for req_id in req_ids],
                        dtype=np.int64)

    def refill_next(self, req_ids: list[str]) -> None:
        """These requests' caches miss the tokens of a round that ran no
        draft forward: the next round that drafts fills them afresh."""
        for req_id in req_ids:
            cache = self.holder.get(req_id)
            if cache is not None:
                self.filled_round[cache] = STALE
