"""KV compaction after tree verification.

A request's tree nodes were written, in topological order, at the slots of
positions prefix_len + 0, 1, ... (the slots a chain would use). After
acceptance the accepted path a_0 .. a_{m-1} (local node indices) must sit at
positions prefix_len + 0 .. m - 1, so that vLLM's rollback of
`num_computed_tokens` and its prefix caching see a plain chain. Topological
order gives a_j >= j, and the path is increasing, so no move reads a slot an
earlier move wrote: one batched gather-then-scatter per cache is enough.
"""

from __future__ import annotations

import torch

from vllm_specextend.paged_cache import slots_of


def compaction_moves(accepted: torch.Tensor, num_accepted: torch.Tensor,
                     prefix_lens: torch.Tensor, block_table: torch.Tensor,
                     block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination slots [num_moves] of the accepted nodes that
    are not already where a chain would put them (planned once per step;
    the same moves apply to every layer's cache)."""
    path_index = torch.arange(accepted.shape[1], device=accepted.device)[None, :]
    needed = (path_index < num_accepted[:, None]) & (accepted != path_index)
    base = prefix_lens.long()[:, None]
    source = slots_of(block_table, base + accepted.clamp(min=0), block_size)
    destination = slots_of(block_table, base + path_index, block_size)
    return source[needed], destination[needed]
