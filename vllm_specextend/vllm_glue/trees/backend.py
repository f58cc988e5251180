"""Hybrid Tree Attention as a vLLM attention backend (CPU build of vLLM).

Registered over `CPU_ATTN` (vLLM's CPU platform always asks for it) when
`hybrid_tree_attention` or `tree` is on. Every layer runs vLLM's own kernel
first; a target layer then computes the step's verification rows again
with HTA and overwrites them: prefix part + tree part + LSE merge. Which
rows is planned once per step by the runner (`verification`) in the
proposer's `StepRecord`, handed to the target's layers at load; the
draft's layers get none and verify nothing. HTA reads vLLM's own (packed)
cache through `kv_cache_reader`; the plugin keeps no copy of it.
"""

from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_specextend.attention.hybrid_tree_attention import hybrid_tree_attention_cpu
from vllm_specextend.tree.verification import ScheduledTrees
from vllm_specextend.vllm_glue.kv_cache_reader import reader_for
from vllm_specextend.vllm_glue.logs import info_first, logger
from vllm_specextend.vllm_glue.step import StepRecord

BACKEND_PATH = f"{__name__}.HybridTreeCPUAttentionBackend"


class HybridTreeCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        self.block_size = vllm_config.cache_config.block_size
        self.reader = reader_for(self, self.block_size, vllm_config.model_config.dtype,
                                 vllm_config.cache_config.cache_dtype)
        self.step: StepRecord | None = None  # a target layer's, from `verify_with`

    def verify_with(self, step: StepRecord) -> None:
        """Make this a verifying (target) layer of the runner owning `step`."""
        self.step = step

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 *args, **kwargs)
        trees = None if self.step is None else self.step.verification
        if trees is not None and attn_metadata is not None:
            self._verify_with_hta(trees, query, kv_cache, attn_metadata.block_table, output)
        return output

    def _verify_with_hta(self, trees: ScheduledTrees, query, kv_cache, block_table, output):
        out = hybrid_tree_attention_cpu(
            query[trees.tokens], lambda slots: self.reader.read(kv_cache, slots),
            block_table[trees.rows], trees.prefix_lens, trees.tree_start_loc,
            trees.ancestor_masks, self.block_size, scale=self.scale)
        heads = output.view(output.shape[0], self.num_heads, self.head_size)
        heads[trees.tokens] = out.to(output.dtype)
        info_first("SpecExtend: Hybrid Tree Attention verified its first rows (%s)",
                   "draft trees" if trees.draft_tree is not None else "chains")

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
