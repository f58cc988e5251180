"""Plain copies of a layer's keys (and values) for our own kernels: vLLM's
CPU cache keeps keys packed per block, so they are written again, at the
same slots, into [num_slots, num_kv_heads, head_dim] tensors. Rows past
vLLM's slots are scratch (the draft's tree nodes)."""

from __future__ import annotations

import torch


class KVMirror:
    def __init__(self, with_values: bool = True):
        self.with_values = with_values
        self.keys: torch.Tensor | None = None  # [num_slots + scratch, num_kv_heads, head_dim]
        self.values: torch.Tensor | None = None
        self.num_cache_slots = 0

    def write(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              slot_mapping: torch.Tensor, num_tokens: int) -> None:
        """Store this forward's first `num_tokens` keys/values where vLLM
        stores them (slot -1: padding, skipped); sized from vLLM's cache."""
        if self.keys is None:
            self.num_cache_slots = kv_cache.numel() // (2 * key.shape[1] * key.shape[2])
            shape = (self.num_cache_slots, *key.shape[1:])
            self.keys = torch.zeros(shape, dtype=key.dtype, device=key.device)
            if self.with_values:
                self.values = torch.zeros(shape, dtype=key.dtype, device=key.device)
        slots = slot_mapping[:num_tokens].long()
        written = slots >= 0
        self.keys[slots[written]] = key[:num_tokens][written]
        if self.with_values:
            self.values[slots[written]] = value[:num_tokens][written]

    def reserve_scratch(self, rows: int) -> int:
        """Make room for `rows` scratch rows after vLLM's slots (grown by
        doubling, so a growing batch copies the mirror only a few times);
        returns the first scratch slot. Call after the first `write`."""
        needed = self.num_cache_slots + rows
        if self.keys.shape[0] < needed:
            grown = max(needed, self.num_cache_slots + 2 * (self.keys.shape[0]
                                                             - self.num_cache_slots))
            self.keys = _grown(self.keys, grown)
            if self.with_values:
                self.values = _grown(self.values, grown)
        return self.num_cache_slots


def _grown(rows: torch.Tensor, total: int) -> torch.Tensor:
    extra = rows.new_zeros((total - rows.shape[0], *rows.shape[1:]))
    return torch.cat((rows, extra))
