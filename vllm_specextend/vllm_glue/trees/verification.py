"""The target's side of HTA verification in vLLM's V1 runner, planned once
per step (`TreeVerification.plan`, after `_prepare_inputs`) into the
proposer's `StepRecord`, which every target layer reads.

Chains (`hybrid_tree_attention`): rows with drafts over a cached prefix of
at least `hybrid_tree_attention_min_len` tokens, each chain a path-shaped
tree, planned from the host's copies (no device read).

Trees (`tree`): vLLM schedules a tree's nodes as the request's draft
tokens, in topological order, and computes their slots as for a chain; the
plan moves the nodes' RoPE positions to root + depth and builds the
step's ancestor masks. `_sample` is replaced for steps with drafts: the
target's token at every node (argmax, or one sample of its processed
distribution), the path those tokens follow from the root, the accepted
path's K/V moved to the chain slots in every target layer, and the
runner's inputs reordered so vLLM's bookkeeping and the draft's first pass
see the path as an accepted chain.
"""

from __future__ import annotations

import torch
from vllm.v1.outputs import LogprobsTensors, SamplerOutput

from vllm_specextend.config import SpecExtendConfig
from vllm_specextend.tree.compaction import compaction_moves
from vllm_specextend.tree.dynamic_tree import DraftTree
from vllm_specextend.tree.verification import (
    AcceptedTrees,
    ScheduledTrees,
    accept_drawn,
    accepted_first_moves,
    chain_rows,
    drafts_as_trees,
    plan_trees,
)
from vllm_specextend.vllm_glue.logs import info_first
from vllm_specextend.vllm_glue.sampling import node_sampling_metadata
from vllm_specextend.vllm_glue.step import StepRecord
from vllm_specextend.vllm_glue.trees.backend import HybridTreeCPUAttentionImpl


class TreeVerification:
    """Owned by the runner's proposer; plans into its `StepRecord`, which the
    target's layers share."""

    def __init__(self, settings: SpecExtendConfig, step: StepRecord,
                 target_layers: dict[str, object], query_buffers: list[torch.Tensor]):
        self.trees = settings.tree
        self.min_prefix_len = settings.hybrid_tree_attention_min_len
        self.step = step
        # Per-token buffers of the step that tree compaction reorders beside
        # the runner's own (the captured target queries, with retrieval on).
        self.query_buffers = query_buffers
        self.layers = [(layer, layer.impl) for layer in target_layers.values()
                       if isinstance(getattr(layer, "impl", None), HybridTreeCPUAttentionImpl)]
        for _, impl in self.layers:
            impl.verify_with(self.step)

    def plan(self, runner, spec_decode_metadata) -> None:
        """This step's HTA rows (None: no drafts, or no row needs HTA)."""
        self.step.verification = None
        if spec_decode_metadata is None:
            return
        num_reqs = len(spec_decode_metadata.num_draft_tokens)
        query_ends = runner.query_start_loc.np[1: num_reqs + 1]
        if not self.trees:
            self.step.verification = chain_rows(
                spec_decode_metadata.num_draft_tokens,
                runner.input_batch.num_computed_tokens_cpu[:num_reqs], query_ends,
                self.min_prefix_len)
            return
        planned = plan_trees(self.step.proposed_trees, runner.input_batch.req_ids,
                             spec_decode_metadata.num_draft_tokens,
                             spec_decode_metadata.draft_token_ids,
                             torch.as_tensor(query_ends, dtype=torch.long), runner.positions)
        if planned is not None:
            # The nodes were scheduled at chain positions: RoPE reads tree ones.
            self.step.verification, tree_positions = planned
            runner.positions[self.step.verification.tokens] = tree_positions

    def sample(self, runner, logits, spec_decode_metadata, vllm_sample) -> SamplerOutput:
        """The step's sampling (`_sample`): trees are accepted here, chains by
        vLLM's rejection sampler. The step's rows are done with either way."""
        trees, self.step.verification = self.step.verification, None
        if not self.trees or spec_decode_metadata is None:
            return vllm_sample(logits, spec_decode_metadata)
        tree = trees.draft_tree if trees is not None else drafts_as_trees(
            spec_decode_metadata.num_draft_tokens, spec_decode_metadata.draft_token_ids)
        return self._accept(runner, logits, spec_decode_metadata, tree, trees)

    def _accept(self, runner, logits, spec_decode_metadata, tree: DraftTree,
                trees: ScheduledTrees | None) -> SamplerOutput:
        """Draw the target's token at every tree row with vLLM's sampler,
        follow those tokens through each request's tree (exact for sampling
        too, see `accept_path`) and compact the accepted paths. Each output
        token's logprobs are those of the row it was drawn at."""
        rows_per_request = torch.tensor(spec_decode_metadata.num_draft_tokens) + 1
        drawn = runner.sampler(logits, node_sampling_metadata(
            runner.input_batch.sampling_metadata, rows_per_request))
        accepted = accept_drawn(tree, drawn.sampled_token_ids.view(-1).long(),
                                rows_per_request)
        if trees is not None and bool(accepted.num_accepted.any()):
            self._compact(runner, trees, tree, accepted)
        logprobs = drawn.logprobs_tensors
        if logprobs is not None:
            rows = accepted.drawn_rows
            logprobs = LogprobsTensors(logprob_token_ids=logprobs.logprob_token_ids[rows],
                                       logprobs=logprobs.logprobs[rows],
                                       selected_token_ranks=logprobs.selected_token_ranks[rows])
        return SamplerOutput(sampled_token_ids=accepted.sampled, logprobs_tensors=logprobs)

    def _compact(self, runner, trees: ScheduledTrees, tree: DraftTree,
                 accepted: AcceptedTrees) -> None:
        """Accepted nodes to chain slots in every target layer; the step's
        per-token buffers (tokens, positions, captured queries) reordered to
        match."""
        num_reqs = runner.input_batch.num_reqs
        block_table = runner.input_batch.block_table[0].get_device_tensor(num_reqs)
        root_positions = torch.zeros(num_reqs, dtype=torch.long)
        root_positions[trees.rows] = trees.prefix_lens.long()
        source, destination = compaction_moves(accepted.accepted, accepted.num_accepted,
                                               root_positions + 1, block_table,
                                               runner.cache_config.block_size)
        if source.numel():
            for layer, impl in self.layers:
                impl.compact(layer, layer.kv_cache, source, destination)
            info_first("SpecExtend: moved the first accepted tree nodes to chain slots "
                       "(%d nodes)", source.numel())
        new_index, old_index = accepted_first_moves(trees, accepted, tree.num_nodes)
        for buffer in self.reordered_buffers(runner):
            buffer[new_index] = buffer[old_index]

    def reordered_buffers(self, runner) -> list[torch.Tensor]:
        """The step's per-token buffers that compaction reorders."""
        return [runner.input_ids.gpu, runner.positions, *self.query_buffers]
