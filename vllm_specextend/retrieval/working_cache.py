"""The draft's working cache (SpecExtend section 3.2), laid out on device.

At a refresh, a request of C cached tokens keeps its recent window, from the
chunk boundary `recent_tokens` before C, and the top-k chunks before that
window by score. Its working cache holds them at compact positions: the
kept chunks in position order at 0..R-1, then the window at R.. . Every
later token (accepted until the next refresh, then the drafts) follows at
the next compact position, so the window and what comes after it sit at
their true position minus one offset per request.

Every shape here is fixed by the settings and the batch, never by tensor
values: the layout is built on device without host syncs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WorkingCacheLayout:
    """Where each compact position of a request's working cache comes from."""

    source_positions: torch.Tensor  # [rows, capacity] true positions; padding: 0
    lengths: torch.Tensor  # [rows] compact positions in use
    offsets: torch.Tensor  # [rows] true minus compact position from the window on


def window_starts(context_lens: torch.Tensor, chunk_size: int,
                  recent_tokens: int) -> torch.Tensor:
    """First position of each request's recent window: a chunk boundary, so
    the chunks before it compete whole and the window overlaps none."""
    start = (context_lens.long() - recent_tokens).clamp(min=0)
    return start // chunk_size * chunk_size


def streaming_scores(num_chunks: int, batch: int, device=None) -> torch.Tensor:
    """Scores of the recency ablation (StreamingLLM): the first chunk (the
    attention sink) ranks first, then the newest chunks; with the same top-k
    and window the budget equals CMR's."""
    scores = torch.arange(num_chunks, dtype=torch.float32, device=device)
    scores[0] = num_chunks
    return scores.expand(batch, -1)


def select_chunks(chunk_scores: torch.Tensor, window_start: torch.Tensor, chunk_size: int,
                  top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k chunks by score among those before each window: chunk
    indices [rows, min(top_k, max_chunks)] in ascending order (unused
    columns after them) and how many were kept [rows]."""
    num_chunks = chunk_scores.shape[1]
    chunk = torch.arange(num_chunks, device=chunk_scores.device)
    competing = chunk[None, :] < (window_start // chunk_size)[:, None]
    scores = torch.where(competing, chunk_scores, float("-inf"))
    top = scores.topk(min(top_k, num_chunks), dim=1)
    kept = torch.isfinite(top.values)
    ascending = torch.where(kept, top.indices, num_chunks).sort(dim=1).values
    return ascending, kept.sum(dim=1)


def working_cache_layout(kept_chunks: torch.Tensor, num_kept: torch.Tensor,
                         window_start: torch.Tensor, context_lens: torch.Tensor,
                         chunk_size: int, capacity: int) -> WorkingCacheLayout:
    """Compact position j of a request holds the j-th kept-chunk token while
    j < R (R = kept chunks x chunk_size), then the window's tokens."""
    j = torch.arange(capacity, device=kept_chunks.device)[None, :]
    retrieved = num_kept.long()[:, None] * chunk_size
    chunk_column = (j // chunk_size).clamp(max=kept_chunks.shape[1] - 1)
    chunk_token = kept_chunks.gather(1, chunk_column.expand(kept_chunks.shape[0], -1))
    lengths = retrieved[:, 0] + context_lens.long() - window_start
    in_window = window_start[:, None] + j - retrieved
    source = torch.where(j < retrieved, chunk_token * chunk_size + j % chunk_size,
                         torch.where(j < lengths[:, None], in_window, 0))
    return WorkingCacheLayout(source, lengths, window_start - retrieved[:, 0])
