"""Per-request acceptance by draft position, decayed over recent steps.

A verification step that scheduled d drafts for a request and accepted n of
them says: positions 1..n were accepted, position n + 1 (if n < d) was
rejected, positions past it were not tried. Each request keeps decayed
accepted/tried counts per position. Its estimate at the first position is
shrunk toward the engine's pooled rate there, so a new request starts from
what the engine has seen; at each later position toward its own estimate
at the position before, so a request whose drafts turn good is expected to
keep them good further out than it has tried lately (the engine's rate at
an untried position would stay stale).
"""

from __future__ import annotations

import numpy as np


class AcceptanceByPosition:
    def __init__(self, max_requests: int, max_drafts: int, decay: float = 0.9,
                 prior_weight: float = 2.0, initial_rate: float = 0.7):
        self.max_drafts = max_drafts
        self.decay = decay
        self.prior_weight = prior_weight
        self.accepted = np.zeros((max_requests, max_drafts))
        self.tried = np.zeros((max_requests, max_drafts))
        # The engine's pooled counts, seeded with `initial_rate` so that
        # requests draft (and learn) before anything was observed.
        self.pooled_accepted = np.full(max_drafts, initial_rate * prior_weight)
        self.pooled_tried = np.full(max_drafts, prior_weight)
        self.slot_of: dict[str, int] = {}
        self._free = list(range(max_requests - 1, -1, -1))

    def slots(self, req_ids: list[str]) -> np.ndarray:
        """Each request's row, taken on first sight."""
        return np.array([self._slot(req_id) for req_id in req_ids], dtype=np.int64)

    def _slot(self, req_id: str) -> int:
        slot = self.slot_of.get(req_id)
        if slot is None:
            slot = self.slot_of[req_id] = self._free.pop()
            self.accepted[slot] = 0.0
            self.tried[slot] = 0.0
        return slot

    def release(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id, None)
        if slot is not None:
            self._free.append(slot)

    def observe(self, slots: np.ndarray, drafted: np.ndarray, accepted: np.ndarray) -> None:
        """One verification step of the requests in `slots` (drafted > 0)."""
        positions = np.arange(self.max_drafts)
        tried = positions[None, :] < np.minimum(accepted + 1, drafted)[:, None]
        hit = positions[None, :] < accepted[:, None]
        self.accepted[slots] = self.accepted[slots] * self.decay + hit
        self.tried[slots] = self.tried[slots] * self.decay + tried
        self.pooled_accepted = self.pooled_accepted * self.decay + hit.sum(axis=0)
        self.pooled_tried = self.pooled_tried * self.decay + tried.sum(axis=0)

    def rates(self, slots: np.ndarray) -> np.ndarray:
        """[requests, max_drafts]: P(draft j accepted | drafts before it were)."""
        rates = np.empty((len(slots), self.max_drafts))
        prior = np.full(len(slots), self.pooled_accepted[0] / max(self.pooled_tried[0], 1e-9))
        for position in range(self.max_drafts):
            rates[:, position] = prior = (
                (self.accepted[slots, position] + self.prior_weight * prior)
                / (self.tried[slots, position] + self.prior_weight))
        return rates


def expected_tokens(rates: np.ndarray) -> np.ndarray:
    """[requests, max_drafts + 1]: tokens a step yields drafting k = 0..max
    tokens (the bonus token, plus each accepted draft)."""
    chained = np.cumprod(rates, axis=1)
    return 1.0 + np.concatenate([np.zeros((len(rates), 1)), np.cumsum(chained, axis=1)],
                                axis=1)
