"""Hybrid Tree Attention as a vLLM attention backend (CPU build of vLLM).

Registered over `CPU_ATTN` (vLLM's CPU platform always asks for it) when
`hybrid_tree_attention` or `tree` is on. Every layer runs vLLM's own kernel
first; then rows that verify drafts are computed again with HTA and
overwritten: prefix part + tree part + LSE merge. In tree mode those are
the rows the runner planned (`tree_step.TREE_STATE.scheduled`), whatever
their prefix; with chains, rows with 1 < query_len <= k + 1 over a cached
prefix of at least `hybrid_tree_attention_min_len` tokens, the drafts as a
path-shaped tree. HTA reads vLLM's own (packed) cache through
`kv_cache_reader`; the plugin keeps no copy of it.
"""

from __future__ import annotations

import logging

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_specextend.attention.hybrid_tree_attention import (
    ancestor_bitmasks,
    hybrid_tree_attention_cpu,
)
from vllm_specextend.vllm_glue.engine_config import settings_of
from vllm_specextend.vllm_glue.kv_cache_reader import reader_for
from vllm_specextend.vllm_glue.tree_step import TREE_STATE, ScheduledTrees

logger = logging.getLogger("vllm.specextend")
BACKEND_PATH = f"{__name__}.HybridTreeCPUAttentionBackend"


class HybridTreeCPUAttentionImpl(CPUAttentionBackendImpl):
    logged_first_rows = False  # once per process, not per layer
    # The chain rows of the step's metadata, planned by its first layer (vLLM
    # hands every target layer the same metadata object) for the others.
    chain_plan: tuple[object, ScheduledTrees | None] = (None, None)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        settings = settings_of(vllm_config)
        speculative = vllm_config.speculative_config
        self.min_prefix_len = settings.hybrid_tree_attention_min_len
        self.verifies_chains = settings.hybrid_tree_attention and not settings.tree
        self.max_nodes = speculative.num_speculative_tokens + 1
        self.block_size = vllm_config.cache_config.block_size
        self.reader = reader_for(self, self.block_size, vllm_config.model_config.dtype,
                                 vllm_config.cache_config.cache_dtype)
        # Off for the draft's layers: only the target verifies.
        self.verifies = self.attn_type == AttentionType.DECODER

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 *args, **kwargs)
        if not self.verifies or attn_metadata is None or attn_metadata.max_query_len <= 1:
            return output
        trees = TREE_STATE.scheduled
        if trees is None and self.verifies_chains:
            planned_for, trees = HybridTreeCPUAttentionImpl.chain_plan
            if planned_for is not attn_metadata:
                trees = self._chain_rows(attn_metadata)
                HybridTreeCPUAttentionImpl.chain_plan = (attn_metadata, trees)
        if trees is not None:
            self._verify_with_hta(trees, query, kv_cache, attn_metadata.block_table, output)
        return output

    def _chain_rows(self, attn_metadata) -> ScheduledTrees | None:
        """Chain drafts over long enough prefixes, as path-shaped trees."""
        starts = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        rows = [row for row, seq_len in enumerate(seq_lens)
                if 1 < starts[row + 1] - starts[row] <= self.max_nodes
                and seq_len - (starts[row + 1] - starts[row]) >= self.min_prefix_len]
        if not rows:
            return None
        node_counts = [starts[row + 1] - starts[row] for row in rows]
        tree_start_loc = torch.tensor([0] + node_counts).cumsum(0)
        # Each node's parent is the node before it.
        parents = torch.cat([torch.arange(-1, n - 1) for n in node_counts])
        return ScheduledTrees(
            rows=torch.tensor(rows),
            tokens=torch.cat([torch.arange(starts[row], starts[row + 1]) for row in rows]),
            prefix_lens=torch.tensor([seq_lens[row] for row in rows]) - torch.tensor(node_counts),
            tree_start_loc=tree_start_loc,
            ancestor_masks=ancestor_bitmasks(parents, tree_start_loc))

    def _verify_with_hta(self, trees: ScheduledTrees, query, kv_cache, block_table, output):
        out = hybrid_tree_attention_cpu(
            query[trees.tokens], lambda slots: self.reader.read(kv_cache, slots),
            block_table[trees.rows], trees.prefix_lens, trees.tree_start_loc,
            trees.ancestor_masks, self.block_size, scale=self.scale)
        heads = output.view(output.shape[0], self.num_heads, self.head_size)
        heads[trees.tokens] = out.to(output.dtype)
        if not HybridTreeCPUAttentionImpl.logged_first_rows:
            HybridTreeCPUAttentionImpl.logged_first_rows = True
            logger.info("SpecExtend: Hybrid Tree Attention verified its first rows (%s)",
                        "draft trees" if TREE_STATE.scheduled is not None
                        else f"prefixes from {self.min_prefix_len} tokens")

    def compact(self, layer, kv_cache: torch.Tensor, source: torch.Tensor,
                destination: torch.Tensor) -> None:
        """After tree acceptance: move the accepted nodes' K/V to the slots a
        chain of them would use (`tree.compaction` plans the moves: no move
        reads a slot an earlier one writes). The cache's packed layout depends
        on the CPU's ISA, so the moved rows are read back and written again
        through vLLM's own cache write."""
        keys, values = self.reader.read(kv_cache, source)
        self.do_kv_cache_update(layer, keys, values, kv_cache, destination)


class HybridTreeCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU backend (same name, cache layout and metadata) with HTA
    verification rows."""

    @staticmethod
    def get_impl_cls() -> type[HybridTreeCPUAttentionImpl]:
        return HybridTreeCPUAttentionImpl


def register_hybrid_tree_backend() -> None:
    """Point CPU_ATTN at our backend; before the model builds its layers."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if AttentionBackendEnum.CPU_ATTN.get_path() != BACKEND_PATH:
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
        logger.info("SpecExtend: Hybrid Tree Attention backend registered over CPU_ATTN")
