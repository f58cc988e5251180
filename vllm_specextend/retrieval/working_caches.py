"""Working caches: cache blocks kept for drafting, per draft layer, and the
drafting round that reads them.

Each draft layer gets cache blocks of its own shape and layout, allocated
while the models load (so vLLM's memory profiling counts them) and viewed
like the layer's own cache once vLLM has laid that out: one run of blocks
per working cache, a request holding one while its context is past
`retrieval_min_len`. A refresh lays the request's working set out
there at compact positions, keys rotated for them (`fill`); between
refreshes the draft's own forwards append at the next compact positions.

A draft forward then runs vLLM's own attention twice at most, each over a
sub-batch with metadata built once per forward by the draft's builder:
rows without a working cache over vLLM's cache (true positions, a sliding
window of `main_window`), rows with one over their working cache (a
remapped block table, compact sequence lengths and slots, queries rotated
to compact positions). Which rows hold a cache is decided on the host, from
lengths vLLM keeps on the host; every tensor shape follows from it. The
engine's parts come in as arguments: its layers (`kv_cache`, `num_kv_heads`,
`head_size`, `impl.do_kv_cache_update`), a reader of its packed cache, its
fused RoPE kernel (`move_back`), its metadata builder (`metadata_of`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from vllm_specextend.config import WorkingCacheGeometry
from vllm_specextend.paged_cache import dense_view_like, slots_of
from vllm_specextend.retrieval.draft_rows import RowSplit, TokenSplit
from vllm_specextend.retrieval.ownership import NO_CACHE
from vllm_specextend.retrieval.working_cache import WorkingCacheLayout

# Rotates queries (and keys) in place from position p to p - amount:
# (amount, backward table, query, key=None).
MoveBack = Callable[..., None]


class WorkingCaches:
    """The draft layers' working caches (which request holds which:
    `retrieval.ownership`)."""

    def __init__(self, layers: dict[str, object], geometry: WorkingCacheGeometry,
                 num_caches: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 move_back: MoveBack):
        self.geometry = geometry
        self.move_back = move_back
        self.num_caches = num_caches
        self.block_size = block_size
        self.blocks_per_cache = -(-geometry.capacity // block_size)
        self.num_blocks = num_blocks = num_caches * self.blocks_per_cache
        self.dtype = dtype
        self.storage = {
            name: torch.zeros(num_blocks * layer.num_kv_heads * block_size
                              * (layer.head_size + layer.head_size_v), dtype=dtype, device=device)
            for name, layer in layers.items()}
        self._views: dict[str, torch.Tensor] = {}
        self.block_table = torch.arange(num_blocks, dtype=torch.int32, device=device).view(
            num_caches, self.blocks_per_cache)
        # Per cache: true minus compact position of its window and later tokens.
        self.offsets = torch.zeros(num_caches, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage.values())

    def cache_of(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Layer `name`'s working caches, viewed with the shape per block and
        the dimension order of its vLLM cache `like`."""
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = dense_view_like(self.storage[name], like,
                                                        self.num_blocks)
        return view

    def slot_base(self, caches: torch.Tensor) -> torch.Tensor:
        return caches.long() * (self.blocks_per_cache * self.block_size)

    def fill(self, layers: dict[str, object], reader, main_block_table: torch.Tensor,
             caches: torch.Tensor, layout: WorkingCacheLayout, backward: torch.Tensor) -> None:
        """Lay each row's working set out at compact positions in its cache
        (`caches` [rows]), from every draft layer's K/V in vLLM's cache (read
        by `reader`, written by the layer's own cache write): a
        key moves back from its true position to its compact one (never
        forward: a kept token's compact position is at most its true one)."""
        capacity = self.geometry.capacity
        compact = torch.arange(capacity, device=caches.device)
        used = compact[None, :] < layout.lengths[:, None]
        sources = slots_of(main_block_table, layout.source_positions, self.block_size).flatten()
        destinations = torch.where(used, self.slot_base(caches)[:, None] + compact,
                                   NO_CACHE).flatten()
        # Padding columns (not written) move by 0, inside the table.
        amount = torch.where(used, layout.source_positions - compact, 0).flatten()
        self.offsets[caches] = layout.offsets
        for name, layer in layers.items():
            keys, values = reader.read(layer.kv_cache, sources)
            self.move_back(amount, backward, keys)
            layer.impl.do_kv_cache_update(layer, keys, values,
                                          self.cache_of(name, layer.kv_cache), destinations)


@dataclasses.dataclass
class DraftStepPlan:
    """Attention metadata of one draft forward with working caches, shared by
    every draft layer (in place of vLLM's, in the forward context)."""

    num_actual_tokens: int
    main: object | None  # vLLM's metadata for rows on vLLM's cache
    main_tokens: torch.Tensor  # their token indices
    compact: object  # vLLM's metadata for rows on their working caches
    compact_tokens: torch.Tensor
    compact_slots: torch.Tensor  # working-cache slot of each compact token (-1: none)
    # True minus compact position of each compact token; None when the
    # tokens are at their compact positions already (draft steps).
    compact_offsets: torch.Tensor | None


class DraftRound:
    """One drafting round (a first pass and the following draft steps): which
    rows draft over working caches, and the index tensors every forward of
    the round reuses, copied to the device once (`staging.to_device(name,
    values)`, through buffers allocated up front: no host sync)."""

    def __init__(self, caches: WorkingCaches, cache_of_row: np.ndarray,
                 first_pass_query_lens: np.ndarray, staging):
        self.caches = caches
        rows = RowSplit.of(cache_of_row)
        self.compact_rows, self.main_rows = rows.compact_rows, rows.main_rows
        self.staging = staging
        self.cache_ids = staging.to_device("caches", cache_of_row[self.compact_rows])
        self.compact_rows_device = staging.to_device("compact_rows", self.compact_rows)
        self.main_rows_device = staging.to_device("main_rows", self.main_rows)
        self.compact_bases = caches.slot_base(self.cache_ids)
        self.compact_block_table = caches.block_table[self.cache_ids]
        self.read_offsets()
        self.first_pass = self._staged("first", rows.tokens(first_pass_query_lens))
        self.steps = self._staged("step", rows.tokens(np.ones(len(cache_of_row),
                                                              dtype=np.int64)))

    @property
    def uses_working_caches(self) -> bool:
        return len(self.compact_rows) > 0

    def read_offsets(self) -> None:
        """The rows' offsets, as the last refresh of their caches set them."""
        self.compact_offsets = self.caches.offsets[self.cache_ids]

    def _staged(self, name: str, split: TokenSplit) -> TokenSplit:
        """`split` with its index arrays on the device."""
        return dataclasses.replace(split, **{
            field: self.staging.to_device(f"{name}_{field}", getattr(split, field))
            for field in TOKEN_INDICES})

    def plan_forward(self, metadata_of, cad, positions: torch.Tensor,
                     draft_index: int) -> tuple[DraftStepPlan, "BufferEdits"]:
        """Split one draft forward's batch (`cad`: vLLM's common attention
        metadata of it); `metadata_of(query_lens, query_start_loc, seq_lens,
        block_table, slot_mapping, max_seq_len)` builds vLLM's metadata of a
        sub-batch, once for every layer. `positions` is the
        proposer's position buffer of the forward: true positions in the
        first pass, whose tokens vLLM caches at their true slots and the
        working cache at compact ones; in the first draft step the rows with
        working caches move to their compact positions there (the returned
        edits), and vLLM's own step update advances them from then on, so
        its RoPE rotates their queries and keys for the working cache
        directly."""
        split = self.first_pass if draft_index == 0 else self.steps
        capacity = self.caches.geometry.capacity
        tokens, token_rows = split.compact_tokens, split.compact_token_rows
        offsets = self.compact_offsets[token_rows]
        at_true_positions = draft_index <= 1
        compact_positions = positions[tokens] - (offsets if at_true_positions else 0)
        writable = (cad.slot_mapping[tokens] >= 0) & (compact_positions >= 0) & (
            compact_positions < capacity)
        compact_slots = torch.where(writable, self.compact_bases[token_rows] + compact_positions,
                                    NO_CACHE)
        compact = metadata_of(
            split.query_lens[self.compact_rows], split.compact_query_start_loc,
            cad.seq_lens[self.compact_rows_device] - self.compact_offsets,
            self.compact_block_table, compact_slots, capacity)
        main = None
        if len(self.main_rows):
            main = metadata_of(
                split.query_lens[self.main_rows], split.main_query_start_loc,
                cad.seq_lens[self.main_rows_device],
                cad.block_table_tensor[self.main_rows_device],
                cad.slot_mapping[split.main_tokens], cad.max_seq_len)
        plan = DraftStepPlan(
            num_actual_tokens=split.num_tokens, main=main, main_tokens=split.main_tokens,
            compact=compact, compact_tokens=tokens, compact_slots=compact_slots,
            compact_offsets=offsets if draft_index == 0 else None)
        # A drafted token is rewritten by the next first pass once verified:
        # in vLLM's cache it would be a wasted write.
        edits = BufferEdits(tokens, compact_positions if draft_index == 1 else None,
                                drop_cache_writes=draft_index > 0)
        return plan, edits


@dataclasses.dataclass
class BufferEdits:
    """What one draft forward with working caches changes in the proposer's
    per-token buffers before it runs (the caller writes them)."""

    tokens: torch.Tensor  # the compact rows' token indices
    positions: torch.Tensor | None  # their new (compact) positions, if they move
    drop_cache_writes: bool  # their keys go to no slot of vLLM's cache

    def apply(self, positions: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if self.positions is not None:
            positions[self.tokens] = self.positions
        if self.drop_cache_writes:
            slot_mapping[self.tokens] = NO_CACHE


# Index arrays a round copies to the device, each at most one per token.
TOKEN_INDICES = ("compact_tokens", "compact_token_rows", "compact_query_start_loc",
                 "main_tokens", "main_query_start_loc")
STAGED_ARRAYS = ("caches", "compact_rows", "main_rows", "due_rows", "due_caches") + tuple(
    f"{split}_{what}" for split in ("first", "step") for what in TOKEN_INDICES)
