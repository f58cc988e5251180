"""Draft side of SpecExtend inside vLLM's draft-model proposer (V1 runner).

After the proposer loads the draft, each draft attention module gets a
rotary embedding that leaves q and k un-rotated, and its attention
implementation is replaced: keys and values are stored un-rotated at their
true slots (slots come from true positions and the shared block table, as
vLLM computes them), in plain per-layer buffers because the CPU cache layout
is packed; attention then reads each request's rows (`plan_draft_rows`) at
compact positions (`working_set_attention`, or its CPU path).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from vllm_specextend.attention.draft_tree_attention import (
    draft_tree_attention,
    draft_tree_attention_cpu,
)
from vllm_specextend.attention.working_set_attention import (
    working_set_attention,
    working_set_attention_cpu,
)
from vllm_specextend.config import SpecExtendConfig
from vllm_specextend.retrieval.draft_rows import DraftRows, plan_draft_rows
from vllm_specextend.retrieval.working_set import WorkingSets, working_set_positions
from vllm_specextend.vllm_glue.cross_model_retrieval import (
    CrossModelRetrieval,
    FinalLayerCapture,
)
from vllm_specextend.vllm_glue.engine_config import settings_of
from vllm_specextend.vllm_glue.kv_mirror import KVMirror
from vllm_specextend.vllm_glue.tree_drafting import DraftTreeLayer, TreeDrafter

logger = logging.getLogger("vllm.specextend")


class UnrotatedPositions(nn.Module):
    """Stands in for a draft layer's rotary embedding: RoPE is applied at
    read time, at compact positions."""

    def forward(self, positions, query, key):
        return query, key


class DraftRowPlanner:
    """Builds the rows of one draft forward once; every layer reuses them."""

    def __init__(self, window: int, piece_len: int, draft_max_positions: int):
        self.window = window
        self.piece_len = piece_len
        self.draft_max_positions = draft_max_positions
        # Set for one drafting round by CMR; None before any scores.
        self.working_sets: WorkingSets | None = None
        self._metadata = None
        self._rows: DraftRows | None = None
        self._logged_first_use = False

    def rows_for(self, attn_metadata) -> DraftRows:
        if attn_metadata is not self._metadata:
            qsl, seq_lens = attn_metadata.query_start_loc, attn_metadata.seq_lens
            working_set_keys = None
            if self.working_sets is not None:
                first_positions = seq_lens - (qsl[1:] - qsl[:-1])
                working_set_keys = working_set_positions(
                    self.working_sets, first_positions, attn_metadata.max_seq_len,
                    self.window)
            self._rows = plan_draft_rows(
                qsl, seq_lens, attn_metadata.block_table, self.window, self.piece_len,
                self.draft_max_positions, working_set_keys,
            )
            self._metadata = attn_metadata
            # Checked (a host sync) only until the first working set is used.
            if not self._logged_first_use and working_set_keys is not None \
                    and bool(self._rows.uses_working_set.any()):
                self._logged_first_use = True
                logger.info("SpecExtend: the draft attended to its first working sets")
        return self._rows


class CompactDraftAttention:
    """Replaces one draft layer's `impl.forward`."""

    def __init__(self, impl, cos_sin: torch.Tensor, block_size: int, planner: DraftRowPlanner):
        self.impl = impl
        self.cos_sin = cos_sin
        self.block_size = block_size
        self.planner = planner
        self.kv = KVMirror()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is None:  # profiling / warm-up run
            return output
        num_tokens = attn_metadata.num_actual_tokens
        query = query[:num_tokens]
        if isinstance(attn_metadata, DraftTreeLayer):
            self.kv.write(kv_cache, key, value, attn_metadata.node_slots, num_tokens)
            kernels = (draft_tree_attention, draft_tree_attention_cpu)
            arguments = (query, self.kv.keys, self.kv.values, attn_metadata.context_slots,
                         attn_metadata.context_lens, attn_metadata.query_start_loc,
                         attn_metadata.path_slots, attn_metadata.path_lens, self.cos_sin,
                         self.impl.scale)
        else:
            self.kv.write(kv_cache, key, value, attn_metadata.slot_mapping, num_tokens)
            rows = self.planner.rows_for(attn_metadata)
            kernels = (working_set_attention, working_set_attention_cpu)
            arguments = (query, self.kv.keys, self.kv.values, rows.block_tables,
                         rows.query_start_loc, rows.key_positions, rows.num_keys, self.cos_sin,
                         self.block_size, self.impl.scale)
        if query.is_cuda:
            out, _ = kernels[0](*arguments)
        else:
            out = kernels[1](*arguments)
        output[:num_tokens] = out.reshape(output[:num_tokens].shape).to(output.dtype)
        return output


def _rotary_cos_sin(rotary_emb, head_dim: int) -> torch.Tensor:
    if not getattr(rotary_emb, "is_neox_style", False) or rotary_emb.rotary_dim != head_dim:
        raise ValueError(
            "speculative_config.model: SpecExtend needs a draft with full-head "
            "NeoX-style rotary embeddings (Llama, Qwen2, Mistral)"
        )
    return rotary_emb.cos_sin_cache


def _rotary_attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "rotary_emb") and hasattr(m, "attn")]


def draft_row_planner(settings: SpecExtendConfig, num_speculative_tokens: int,
                      draft_max_positions: int) -> DraftRowPlanner:
    """Rows that keep every compact position in the draft's range. With CMR
    the window is the working-cache budget; tree mode without CMR gives the
    draft a quarter of its positions for prefill pieces and the rest as its
    sliding window. A tree grows up to `tree_max_depth` past any row."""
    tree_depth = settings.tree_max_depth if settings.tree else 0
    if settings.retrieval:
        window = settings.working_cache_budget(num_speculative_tokens)
        piece_len = draft_max_positions - window - tree_depth
    else:
        piece_len = draft_max_positions // 4
        window = draft_max_positions - piece_len - tree_depth
    return DraftRowPlanner(window, piece_len, draft_max_positions)


def install_compact_attention(draft_model: nn.Module, planner: DraftRowPlanner,
                              block_size: int) -> list[KVMirror]:
    """Rewire every attention module of the draft to one shared planner;
    returns the layers' mirrors."""
    modules = _rotary_attention_modules(draft_model)
    if not modules:
        raise ValueError("speculative_config.model: no rotary attention layers found in the draft")
    mirrors = []
    for module in modules:
        impl = module.attn.impl
        cos_sin = _rotary_cos_sin(module.rotary_emb, module.attn.head_size)
        module.rotary_emb = UnrotatedPositions()
        compact = CompactDraftAttention(impl, cos_sin, block_size, planner)
        impl.forward = compact.forward
        impl.mirror_kv = False  # the HTA backend's mirror: these layers keep their own
        mirrors.append(compact.kv)
    return mirrors


def install_final_layer_capture(target_model: nn.Module) -> FinalLayerCapture:
    impl = _rotary_attention_modules(target_model)[-1].attn.impl
    shared = impl.kv if getattr(impl, "mirror_kv", False) else None  # the HTA backend's
    capture = FinalLayerCapture(impl.forward, shared)
    impl.forward = capture.forward
    return capture


def wrap_proposer_load_model(original):
    @functools.wraps(original)
    def load_model(self, target_model, *args, **kwargs):
        original(self, target_model, *args, **kwargs)
        settings = settings_of(self.vllm_config)
        if settings is None or not (settings.retrieval or settings.tree):
            return
        spec = self.vllm_config.speculative_config
        draft_max = spec.draft_model_config.hf_config.max_position_embeddings
        block_size = self.vllm_config.cache_config.block_size
        self.specextend_planner = draft_row_planner(settings, spec.num_speculative_tokens,
                                                    draft_max)
        mirrors = install_compact_attention(self.model, self.specextend_planner, block_size)
        logger.info("SpecExtend: draft attends at compact positions (window %d, draft "
                    "positions %d)", self.specextend_planner.window, draft_max)
        if settings.retrieval:
            self.specextend_retrieval = CrossModelRetrieval(
                settings, spec.num_speculative_tokens, block_size,
                install_final_layer_capture(target_model))
            logger.info("SpecExtend: the target's last layer scores chunks every %d steps",
                        settings.refresh_every)
        if settings.tree:
            self.specextend_tree_drafter = TreeDrafter(
                self, self.specextend_planner, mirrors, settings, block_size)

    return load_model


def wrap_input_fits_in_drafter(original):
    """vLLM skips drafting for a whole batch when one request is longer than
    the draft's positions; with compact positions the draft takes any length."""

    @functools.wraps(original)
    def input_fits_in_drafter(self, common_attn_metadata):
        settings = getattr(self, "specextend_config", None)
        if settings is not None and (settings.retrieval or settings.tree):
            return common_attn_metadata is not None
        return original(self, common_attn_metadata)

    return input_fits_in_drafter


def wrap_proposer_propose(original):
    """Before each drafting round: refresh scores when due and hand the
    batch's working sets to the draft's row planner; in tree mode, draft
    trees instead of chains."""
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def propose(self, *args, **kwargs):
        retrieval = getattr(self, "specextend_retrieval", None)
        tree_drafter = getattr(self, "specextend_tree_drafter", None)
        if retrieval is None and tree_drafter is None:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        metadata = bound["common_attn_metadata"]
        query_indices = bound.get("token_indices_to_sample")
        if query_indices is None:  # no drafts were verified: the last token
            query_indices = metadata.query_start_loc[1:] - 1
        req_ids = self.specextend_runner.input_batch.req_ids[: metadata.num_reqs]
        if retrieval is not None:
            self.specextend_planner.working_sets = retrieval.before_drafting(
                req_ids, query_indices.long(), bound["target_positions"],
                metadata.block_table_tensor, metadata.max_seq_len)
        try:
            if tree_drafter is None:
                return original(self, *args, **kwargs)
            return tree_drafter.propose(
                req_ids, bound["target_token_ids"], bound["target_positions"],
                bound["next_token_ids"], query_indices, metadata,
                bound.get("num_rejected_tokens_gpu"))
        finally:
            self.specextend_planner.working_sets = None

    return propose
