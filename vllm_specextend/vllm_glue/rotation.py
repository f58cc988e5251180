"""Moving rotated queries and keys back to compact positions with vLLM's own
fused RoPE kernel: one call per layer, whatever the batch, instead of the
dozen small ops `attention.rope.rotate_by` (the reference) would launch."""

from __future__ import annotations

import torch


def move_back_(amount: torch.Tensor, table: torch.Tensor, query: torch.Tensor,
               key: torch.Tensor | None = None) -> None:
    """Rotate `query` [n, heads, head_dim] (and `key`) in place from their
    positions p to p - amount [n] (amount >= 0, int64, contiguous; `table`
    from `rope.backward_table`, in the vectors' dtype)."""
    from vllm import _custom_ops as ops

    count, _, head_dim = query.shape
    ops.rotary_embedding(amount, query.view(count, -1),
                         None if key is None else key.view(count, -1), head_dim, table, True)
