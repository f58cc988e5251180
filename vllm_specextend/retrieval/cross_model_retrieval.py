"""Target side of Cross-model Retrieval (section 3.2).

The target's final attention layer keeps the post-RoPE queries of its last
forward in a buffer allocated while the models load. At a refresh, the query
of each request's last accepted token scores the request's chunks against
the layer's keys, read from the engine's own cache; the top chunks and the
recent window are laid out in the request's working cache. The engine's
parts come in as arguments: the layer (its `kv_cache`, `impl.scale`), a
reader of its packed cache, and how ranks of a split target agree on scores.
"""

from __future__ import annotations

from typing import Callable

import torch

from vllm_specextend.config import SpecExtendConfig, WorkingCacheGeometry
from vllm_specextend.paged_cache import slots_of
from vllm_specextend.retrieval.chunk_scores import chunk_scores, chunk_scores_dense
from vllm_specextend.retrieval.working_cache import (
    select_chunks,
    streaming_scores,
    window_starts,
    working_cache_layout,
)


class FinalLayerCapture:
    """Wraps the target's last attention `impl.forward`: copies the queries,
    then runs the engine's attention unchanged."""

    def __init__(self, original_forward, max_tokens: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.original_forward = original_forward
        self.queries = torch.empty(max_tokens, num_heads, head_dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.queries.numel() * self.queries.element_size()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is not None:
            num_tokens = attn_metadata.num_actual_tokens
            self.queries[:num_tokens] = query[:num_tokens]
        return self.original_forward(layer, query, key, value, kv_cache, attn_metadata,
                                     output, *args, **kwargs)


class CrossModelRetrieval:
    """Chooses each refreshed request's working set from the target's scores."""

    def __init__(self, settings: SpecExtendConfig, geometry: WorkingCacheGeometry,
                 capture: FinalLayerCapture, target_layer, target_reader, block_size: int,
                 agree_on_scores: Callable[[torch.Tensor], torch.Tensor]):
        self.settings = settings
        self.geometry = geometry
        self.capture = capture
        self.target_layer = target_layer
        self.target_reader = target_reader
        self.block_size = block_size
        # Each rank of a split target scores with its own heads: all keep
        # the chunks of the mean score.
        self.agree_on_scores = agree_on_scores

    def layout(self, query_indices: torch.Tensor, cached_lens: torch.Tensor,
               scored_lens: torch.Tensor, block_table: torch.Tensor, max_len: int):
        """The working-cache layout of each row: `cached_lens` tokens the
        draft has cached, `scored_lens` tokens the target has (through the
        last accepted one, whose query is at `query_indices`); `max_len`
        bounds them (static, so no host sync)."""
        geometry = self.geometry
        num_chunks = -(-max_len // geometry.chunk_size)
        if self.settings.selection == "recency":
            scores = streaming_scores(num_chunks, len(query_indices), query_indices.device)
        else:
            scores = self._target_chunk_scores(query_indices, scored_lens, block_table, max_len)
        window_start = window_starts(cached_lens, geometry.chunk_size, geometry.recent_tokens)
        kept, num_kept = select_chunks(scores, window_start, geometry.chunk_size,
                                       geometry.top_k_chunks)
        return working_cache_layout(kept, num_kept, window_start, cached_lens,
                                    geometry.chunk_size, geometry.capacity)

    def _target_chunk_scores(self, query_indices, context_lens, block_table, max_len):
        """The last accepted token's final-layer attention, averaged per
        chunk: in place on GPU; gathered first from the packed CPU cache."""
        query = self.capture.queries[query_indices]
        kv_cache = self.target_layer.kv_cache
        scale = self.target_layer.impl.scale
        if query.is_cuda:
            keys = kv_cache.transpose(1, 2)[..., : query.shape[-1]]
            scores = chunk_scores(query, keys, block_table, context_lens, self.block_size,
                                  self.geometry.chunk_size, max_len=max_len, scale=scale)
        else:
            positions = torch.arange(max_len, device=query.device).expand(len(query), -1)
            slots = slots_of(block_table, positions, self.block_size)
            keys = self.target_reader.read_keys(kv_cache, slots.flatten())
            scores = chunk_scores_dense(query, keys.view(len(query), max_len, *keys.shape[1:]),
                                        context_lens, self.geometry.chunk_size, scale=scale)
        return self.agree_on_scores(scores)
