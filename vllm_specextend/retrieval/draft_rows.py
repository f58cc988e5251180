"""Which keys each draft query attends to, as rows for working-set attention.

A draft forward carries, per request, a block of new query tokens at true
positions [first, first + query_len). Each block is cut into pieces of at
most `piece_len` tokens (a long prompt's prefill, chunk by chunk); a piece
attends to its own tokens and to the `window` positions before it. With
`window + piece_len <= draft_max_positions` every compact position the draft
sees stays inside its trained range, whatever the prompt length.

We chose a sliding window for the draft's prefill (rather than retrieval)
because the target has not scored a prompt before its first decode step.
Decode rows of a request with a working set (`working_set_keys`) attend to
it; without one (before its first scores) they use the window: the newest
chunks, as CMR does before its first scores exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftRows:
    """Plan of one draft forward for `working_set_attention` (built once,
    shared by every draft layer)."""

    block_tables: torch.Tensor  # [rows, max_blocks]
    query_start_loc: torch.Tensor  # [rows + 1]
    key_positions: torch.Tensor  # [rows, max_keys] true positions, in order
    num_keys: torch.Tensor  # [rows]
    uses_working_set: torch.Tensor  # [rows] bool: attends to its working set


def plan_draft_rows(
    query_start_loc: torch.Tensor,  # [batch + 1]
    seq_lens: torch.Tensor,  # [batch], including this forward's query tokens
    block_table: torch.Tensor,  # [batch, max_blocks]
    window: int,
    piece_len: int,
    draft_max_positions: int,
    working_set_keys: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DraftRows:
    """`working_set_keys` = (positions [batch, n], counts [batch]): each
    request's working-set positions before its query block. A decode block
    (one piece) of a request with count > 0 attends to those instead of the
    window."""
    if window + piece_len > draft_max_positions:
        raise ValueError(
            f"draft rows of window {window} + piece {piece_len} exceed the draft's "
            f"{draft_max_positions} positions"
        )
    device = query_start_loc.device
    query_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    first_positions = seq_lens.long() - query_lens
    pieces = ((query_lens + piece_len - 1) // piece_len).clamp(min=1)
    row_request = torch.repeat_interleave(torch.arange(len(pieces), device=device), pieces)
    first_row = torch.cumsum(pieces, 0) - pieces
    piece_index = torch.arange(len(row_request), device=device) - first_row[row_request]
    row_start = query_start_loc[:-1].long()[row_request] + piece_index * piece_len
    row_end = torch.minimum(row_start + piece_len, query_start_loc[1:].long()[row_request])
    row_first = first_positions[row_request] + piece_index * piece_len
    row_len = row_end - row_start
    window_start = (row_first - window).clamp(min=0)
    num_older = row_first - window_start

    max_keys = window + piece_len
    offsets = torch.arange(max_keys, device=device)
    key_positions = window_start[:, None] + offsets[None, :]
    use_set = torch.zeros_like(row_len, dtype=torch.bool)
    if working_set_keys is not None:
        set_positions, set_counts = working_set_keys
        counts = set_counts.long()[row_request]
        # A set that outgrew the window (refreshed mid-prefill) is not used.
        use_set = (counts > 0) & (counts <= window) & (pieces[row_request] == 1)
        own = row_first[:, None] + offsets[None, :] - counts[:, None]
        take = min(set_positions.shape[1], max_keys)
        retrieved = torch.zeros_like(key_positions)
        retrieved[:, :take] = set_positions[row_request, :take]
        retrieved = torch.where(offsets[None, :] < counts[:, None], retrieved, own)
        key_positions = torch.where(use_set[:, None], retrieved, key_positions)
        num_older = torch.where(use_set, counts, num_older)
    num_keys = num_older + row_len
    # Holds by construction; checked on device so the GPU path never syncs.
    torch._assert_async((num_keys <= draft_max_positions).all(),
                        "a draft row would see a position past the draft's range")
    key_positions = torch.where(offsets[None, :] < num_keys[:, None], key_positions, 0)
    return DraftRows(
        block_tables=block_table[row_request],
        query_start_loc=torch.cat((row_start, row_end[-1:])).to(torch.int32),
        key_positions=key_positions,
        num_keys=num_keys.to(torch.int32),
        uses_working_set=use_set,
    )
