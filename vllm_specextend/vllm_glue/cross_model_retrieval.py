"""Target side of Cross-model Retrieval inside vLLM's V1 runner.

The target's final attention layer keeps its post-RoPE queries of the last
forward and a plain mirror of its keys (the CPU cache layout is packed and
unreadable). Before each drafting round, on refresh steps, the query of each
request's last accepted token scores the request's chunks; the top chunks
and the recent window become the request's working set, which the draft's
decode rows attend to until the next refresh.
"""

from __future__ import annotations

import logging

import torch

from vllm_specextend.config import SpecExtendConfig
from vllm_specextend.retrieval.chunk_scores import chunk_scores, chunk_scores_reference
from vllm_specextend.retrieval.working_set import (
    WorkingSets,
    select_working_sets,
    streaming_scores,
)
from vllm_specextend.vllm_glue.kv_mirror import KVMirror


logger = logging.getLogger("vllm.specextend")
# A window start past every position: the request has no working set, so
# the draft falls back to its sliding window (full context when short).
NO_WORKING_SET = torch.iinfo(torch.int64).max


class FinalLayerCapture:
    """Replaces the target's last attention `impl.forward`: copies queries
    and keys, then runs vLLM's own attention unchanged."""

    def __init__(self, original_forward, shared_mirror: KVMirror | None = None):
        self.original_forward = original_forward
        self.queries: torch.Tensor | None = None  # [tokens, heads, head_dim]
        # The HTA backend mirrors this layer already (written before forward).
        self.owns_mirror = shared_mirror is None
        self.key_mirror = KVMirror(with_values=False) if self.owns_mirror else shared_mirror

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is not None:
            num_tokens = attn_metadata.num_actual_tokens
            if self.queries is None or self.queries.shape[0] < num_tokens:
                self.queries = torch.empty_like(query[:num_tokens])
            self.queries[:num_tokens] = query[:num_tokens]
            if self.owns_mirror:
                self.key_mirror.write(kv_cache, key, value, attn_metadata.slot_mapping,
                                      num_tokens)
        return self.original_forward(layer, query, key, value, kv_cache, attn_metadata,
                                     output, *args, **kwargs)


class CrossModelRetrieval:
    """Per-runner CMR state: refresh counter and each request's working set."""

    def __init__(self, settings: SpecExtendConfig, num_speculative_tokens: int,
                 block_size: int, capture: FinalLayerCapture):
        self.settings = settings
        self.block_size = block_size
        self.capture = capture
        self.min_len = settings.effective_retrieval_min_len(num_speculative_tokens)
        self.steps = 0
        # The last refresh's working sets, one row per request it scored.
        self.refreshed_rows: dict[str, int] = {}
        self.refreshed_sets: WorkingSets | None = None
        self._logged_first_selection = False

    def refresh(self, req_ids: list[str], query_indices: torch.Tensor,
                context_lens: torch.Tensor, block_table: torch.Tensor, max_len: int) -> None:
        """Score and select for every request of the batch (section 3.2)."""
        settings = self.settings
        if settings.selection == "recency":
            num_chunks = -(-max_len // settings.chunk_size)
            scores = streaming_scores(num_chunks, len(req_ids), context_lens.device)
        else:
            scores = self._target_chunk_scores(query_indices, context_lens, block_table,
                                               max_len)
        sets = select_working_sets(scores, context_lens, settings.chunk_size,
                                   settings.top_k_chunks, settings.recent_tokens)
        # Requests within the budget keep the full context: no working set.
        short = context_lens <= self.min_len
        kept = sets.kept_chunks & ~short[:, None]
        window_start = torch.where(short, NO_WORKING_SET, sets.window_start)
        self.refreshed_sets = WorkingSets(kept, window_start, settings.chunk_size)
        self.refreshed_rows = {req_id: row for row, req_id in enumerate(req_ids)}
        if not self._logged_first_selection and bool((~short).any()):
            self._logged_first_selection = True
            logger.info("SpecExtend: first working sets selected (%d of %d requests "
                        "past %d tokens)", int((~short).sum()), len(req_ids), self.min_len)

    def _target_chunk_scores(self, query_indices, context_lens, block_table, max_len):
        """The last accepted token's final-layer attention, averaged per chunk."""
        query = self.capture.queries[query_indices]
        score = chunk_scores if query.is_cuda else chunk_scores_reference
        kwargs = {"max_len": max_len} if query.is_cuda else {}
        scores = score(query, self.capture.key_mirror.keys, block_table, context_lens,
                       self.block_size, self.settings.chunk_size, **kwargs)
        return _mean_over_tensor_parallel_ranks(scores)

    def before_drafting(self, req_ids: list[str], query_indices: torch.Tensor,
                        target_positions: torch.Tensor, block_table: torch.Tensor,
                        max_len: int) -> WorkingSets | None:
        """Refresh when due; return the batch's working sets (None if no
        request has one yet)."""
        if self.steps % self.settings.refresh_every == 0:
            context_lens = target_positions[query_indices].long() + 1
            self.refresh(req_ids, query_indices, context_lens, block_table, max_len)
        self.steps += 1
        if not self.refreshed_rows:
            return None
        # Requests new since the last refresh have no working set yet.
        rows = torch.tensor([self.refreshed_rows.get(req_id, -1) for req_id in req_ids],
                            device=block_table.device)
        refreshed = rows >= 0
        sets, rows = self.refreshed_sets, rows.clamp(min=0)
        return WorkingSets(sets.kept_chunks[rows] & refreshed[:, None],
                           torch.where(refreshed, sets.window_start[rows], NO_WORKING_SET),
                           self.settings.chunk_size)


def _mean_over_tensor_parallel_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each rank scored with its own heads: average so all ranks keep the
    same chunks."""
    from vllm.distributed import (
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_reduce,
    )

    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return scores
    return tensor_model_parallel_all_reduce(scores) / world_size
