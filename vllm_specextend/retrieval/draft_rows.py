"""A drafting round's rows split by where they draft: over a working cache
(compact positions) or over vLLM's cache (true positions, the sliding
window). Every forward of the round runs vLLM's attention once per part
with its own metadata, so each part needs its tokens' indices in the
forward and its query start locations. Host-side, from the batch's
host copies; the shapes follow from them alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_specextend.retrieval.ownership import NO_CACHE


@dataclass
class TokenSplit:
    """Which tokens of one forward (a first pass, or a draft step) belong to
    which part."""

    query_lens: np.ndarray  # [rows] tokens per row in this forward
    num_tokens: int
    compact_tokens: np.ndarray  # token indices of rows over working caches
    compact_token_rows: np.ndarray  # each one's index among those rows
    compact_query_start_loc: np.ndarray
    main_tokens: np.ndarray  # token indices of rows over vLLM's cache
    main_query_start_loc: np.ndarray


@dataclass
class RowSplit:
    compact_rows: np.ndarray  # rows drafting over their working cache
    main_rows: np.ndarray

    @classmethod
    def of(cls, cache_of_row: np.ndarray) -> "RowSplit":
        return cls(np.flatnonzero(cache_of_row != NO_CACHE),
                   np.flatnonzero(cache_of_row == NO_CACHE))

    def tokens(self, query_lens: np.ndarray) -> TokenSplit:
        starts = query_starts(query_lens)
        compact_tokens, compact_token_rows = concatenated_ranges(
            starts[self.compact_rows], query_lens[self.compact_rows])
        main_tokens, _ = concatenated_ranges(starts[self.main_rows], query_lens[self.main_rows])
        return TokenSplit(
            query_lens=query_lens, num_tokens=int(starts[-1]),
            compact_tokens=compact_tokens, compact_token_rows=compact_token_rows,
            compact_query_start_loc=query_starts(query_lens[self.compact_rows]),
            main_tokens=main_tokens,
            main_query_start_loc=query_starts(query_lens[self.main_rows]))


def query_starts(query_lens: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(query_lens)))


def concatenated_ranges(firsts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """range(firsts[i], firsts[i] + counts[i]) for every i, concatenated, and
    for each value its i."""
    owners = np.repeat(np.arange(len(counts)), counts)
    return np.repeat(firsts - np.cumsum(counts) + counts, counts) + np.arange(len(owners)), owners
