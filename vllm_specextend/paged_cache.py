"""Slot arithmetic of vLLM's paged KV cache (no vLLM import): position p of
a request lives at slot block_table[p // block_size] * block_size +
p % block_size."""

from __future__ import annotations

import torch


def slots_of(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots (int64) of `positions` through `block_table`: one table row with
    positions [n], or tables [batch, max_blocks] with positions [batch, n]."""
    blocks = block_table.gather(-1, (positions // block_size).long())
    return blocks.long() * block_size + positions % block_size
