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


def dense_view_like(storage: torch.Tensor, like: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """`storage` as a dense [num_blocks, *like.shape[1:]] cache whose
    dimensions are laid out in `like`'s order (outermost: largest stride)."""
    shape = (num_blocks, *like.shape[1:])
    if storage.numel() != num_blocks * like[0].numel():
        raise ValueError(f"working cache blocks of {storage.numel() // num_blocks} elements "
                         f"cannot hold vLLM's blocks of shape {tuple(like.shape[1:])}")
    order = sorted(range(len(shape)), key=lambda dim: (like.stride(dim), dim == 0))
    strides = [0] * len(shape)
    step = 1
    for dim in order:
        strides[dim] = step
        step *= shape[dim]
    return torch.as_strided(storage, shape, strides)
