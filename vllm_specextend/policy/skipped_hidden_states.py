"""The target's hidden states of the tokens an EAGLE head skipped.

An EAGLE head's cache entry at position p comes from the token at p + 1
and the target's hidden state at p. A round that skips the head leaves it
without those entries (`policy.stale_drafts`); the catch-up can write them
later only with the hidden states, which the target computes once, in the
step the round follows. They are kept here, per request, by position: a
ring of `positions` per request, longer than a request may fall behind
plus a step's rejected drafts, so no later write lands on a position still
to be read. Allocated while the models load; writes and reads are index
copies, no host sync.
"""

from __future__ import annotations

import numpy as np
import torch


class SkippedHiddenStates:
    def __init__(self, max_requests: int, positions: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.positions = positions
        self.states = torch.zeros(max_requests * positions, hidden_size, dtype=dtype,
                                  device=device)
        self.slot: dict[str, int] = {}  # request id -> its ring
        self.free = list(range(max_requests))

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    def slots_of(self, req_ids: list[str]) -> np.ndarray:
        """Each request's ring, taking a free one where it has none."""
        for req_id in req_ids:
            if req_id not in self.slot:
                self.slot[req_id] = self.free.pop()
        return np.array([self.slot[req_id] for req_id in req_ids], dtype=np.int64)

    def rows_of(self, slots, positions):
        """Rows of `states` for tokens at `positions` of the requests owning
        `slots` (host arrays or device tensors alike)."""
        return slots * self.positions + positions % self.positions

    def keep(self, rows: torch.Tensor, hidden_states: torch.Tensor) -> None:
        self.states.index_copy_(0, rows, hidden_states)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        return self.states.index_select(0, rows)

    def keep_only(self, req_ids) -> None:
        """Free the rings of requests not in `req_ids` (caught up, or gone)."""
        for req_id in [r for r in self.slot if r not in req_ids]:
            self.free.append(self.slot.pop(req_id))

    def held_requests(self) -> int:
        return len(self.slot)
