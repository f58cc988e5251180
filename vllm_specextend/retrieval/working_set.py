"""The draft's working cache (SpecExtend section 3.2), batched on device.

At a refresh, each request keeps its top-k chunks by score and a window of
its newest tokens. Until the next refresh every new token is kept too (the
window's start stays put), so chunks completed in between are always in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WorkingSets:
    """What each request's draft attends to, as chosen at the last refresh."""

    kept_chunks: torch.Tensor  # [batch, max_chunks] bool: retrieved chunks
    window_start: torch.Tensor  # [batch] int64: every position >= it is kept
    chunk_size: int


def streaming_scores(num_chunks: int, batch: int, device=None) -> torch.Tensor:
    """Scores of the recency ablation (StreamingLLM): the first chunk (the
    attention sink) ranks first, then the newest chunks; with the same top-k
    and window the budget equals CMR's."""
    scores = torch.arange(num_chunks, dtype=torch.float32, device=device)
    scores[0] = num_chunks
    return scores.expand(batch, -1)


def select_working_sets(
    chunk_scores: torch.Tensor,  # [batch, max_chunks]; -inf past the context
    context_lens: torch.Tensor,  # [batch]
    chunk_size: int,
    top_k_chunks: int,
    recent_tokens: int,
) -> WorkingSets:
    window_start = (context_lens.long() - recent_tokens).clamp(min=0)
    num_chunks = chunk_scores.shape[1]
    chunk_starts = torch.arange(num_chunks, device=chunk_scores.device) * chunk_size
    # Chunks that start inside the window are kept by the window already.
    competing = chunk_starts[None, :] < window_start[:, None]
    scores = torch.where(competing, chunk_scores, float("-inf"))
    top = scores.topk(min(top_k_chunks, num_chunks), dim=1)
    kept = torch.zeros_like(competing).scatter_(1, top.indices, torch.isfinite(top.values))
    return WorkingSets(kept, window_start, chunk_size)


def working_set_positions(
    working_sets: WorkingSets,
    seq_lens: torch.Tensor,  # [batch] current context length of each request
    max_len: int,  # bound on seq_lens (static, so no host sync)
    max_keys: int,  # bound on the working-set size (static)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions each request's draft attends to, in position order.

    Returns `positions` [batch, max_keys] (padding: 0) and `num_keys` [batch];
    a request with num_keys > max_keys has more than fits (a refresh taken in
    the middle of its chunked prefill) and must not use its set.
    """
    device = seq_lens.device
    positions = torch.arange(max_len, device=device)
    # Positions past the chunks scored at the refresh are all in the window.
    chunk_of = (positions // working_sets.chunk_size).clamp(
        max=working_sets.kept_chunks.shape[1] - 1
    )
    in_kept_chunk = working_sets.kept_chunks[:, chunk_of]
    keep = (in_kept_chunk | (positions[None, :] >= working_sets.window_start[:, None])) & (
        positions[None, :] < seq_lens[:, None].long()
    )
    num_keys = keep.sum(dim=1)
    # Compact: the n-th kept position goes to column n; the rest, and any
    # overflow past max_keys (num_keys then says the set does not fit), to a
    # spare column.
    column = torch.where(keep, keep.cumsum(dim=1) - 1, max_keys).clamp(max=max_keys)
    out = torch.zeros((seq_lens.shape[0], max_keys + 1), dtype=torch.long, device=device)
    out.scatter_(1, column, positions.expand_as(column))
    return out[:, :max_keys], num_keys
