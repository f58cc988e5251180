"""The target's side of HTA verification in vLLM's V1 runner, planned once
per step (`TreeVerification.plan`, after `_prepare_inputs`) into the
runner's `TreeStep`, which every target layer reads.

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

import numpy as np
import torch
from vllm.v1.outputs import LogprobsTensors, SamplerOutput

from vllm_specextend.attention.hybrid_tree_attention import ancestor_bitmasks, chain_bitmasks
from vllm_specextend.config import SpecExtendConfig
from vllm_specextend.retrieval.draft_rows import concatenated_ranges, query_starts
from vllm_specextend.tree.compaction import compaction_moves
from vllm_specextend.tree.dynamic_tree import DraftTree, accept_path
from vllm_specextend.tree.verification import accepted_first_order, verification_layout
from vllm_specextend.vllm_glue.logs import info_first
from vllm_specextend.vllm_glue.sampling import node_sampling_metadata
from vllm_specextend.vllm_glue.trees.backend import HybridTreeCPUAttentionImpl
from vllm_specextend.vllm_glue.trees.step import ScheduledTrees, TreeStep

# Tokens vLLM's bookkeeping drops from a row of sampled ids.
PLACEHOLDER_TOKEN_ID = -1


class TreeVerification:
    """Owned by the runner's proposer; the target's layers share its `step`."""

    def __init__(self, settings: SpecExtendConfig, target_layers: dict[str, object],
                 query_buffers: list[torch.Tensor]):
        self.trees = settings.tree
        self.min_prefix_len = settings.hybrid_tree_attention_min_len
        self.step = TreeStep()
        # Per-token buffers of the step that tree compaction reorders beside
        # the runner's own (the captured target queries, with retrieval on).
        self.query_buffers = query_buffers
        self.layers = [(layer, layer.impl) for layer in target_layers.values()
                       if isinstance(getattr(layer, "impl", None), HybridTreeCPUAttentionImpl)]
        for _, impl in self.layers:
            impl.verify_with(self.step)

    def plan(self, runner, spec_decode_metadata) -> None:
        """This step's HTA rows (None: no drafts, or no row needs HTA)."""
        if spec_decode_metadata is None:
            self.step.scheduled = None
        elif self.trees:
            self.step.scheduled = plan_scheduled_trees(runner, self.step.proposed,
                                                       spec_decode_metadata)
        else:
            self.step.scheduled = self._chain_rows(runner, spec_decode_metadata)

    def _chain_rows(self, runner, spec_decode_metadata) -> ScheduledTrees | None:
        """Rows verifying chain drafts over long enough prefixes, as
        path-shaped trees (host arrays only)."""
        drafts = np.asarray(spec_decode_metadata.num_draft_tokens)
        num_reqs = len(drafts)
        cached = runner.input_batch.num_computed_tokens_cpu[:num_reqs]
        rows = np.flatnonzero((drafts > 0) & (cached >= self.min_prefix_len))
        if not len(rows):
            return None
        nodes = drafts[rows] + 1  # the root (last verified token), then the drafts
        roots = runner.query_start_loc.np[rows + 1] - nodes
        tokens, _ = concatenated_ranges(roots, nodes)
        local = tokens - np.repeat(roots, nodes)  # each node's index in its chain
        return ScheduledTrees(
            rows=torch.from_numpy(rows), tokens=torch.from_numpy(tokens),
            prefix_lens=torch.from_numpy(cached[rows].astype(np.int64)),
            tree_start_loc=torch.from_numpy(query_starts(nodes)),
            ancestor_masks=chain_bitmasks(torch.from_numpy(local)))

    def sample(self, runner, logits, spec_decode_metadata, vllm_sample) -> SamplerOutput:
        """The step's sampling (`_sample`): trees are accepted here, chains by
        vLLM's rejection sampler. The step's rows are done with either way."""
        trees, self.step.scheduled = self.step.scheduled, None
        if not self.trees or spec_decode_metadata is None:
            return vllm_sample(logits, spec_decode_metadata)
        tree = trees.draft_tree if trees is not None else scheduled_drafts(spec_decode_metadata)
        return accept_trees(runner, logits, spec_decode_metadata, tree, trees, self.layers,
                            self.reordered_buffers(runner))

    def reordered_buffers(self, runner) -> list[torch.Tensor]:
        """The step's per-token buffers that compaction reorders."""
        return [runner.input_ids.gpu, runner.positions, *self.query_buffers]

    def forget(self, req_id: str) -> None:
        self.step.proposed.pop(req_id, None)


def plan_scheduled_trees(runner, proposed_trees: dict, spec_decode_metadata
                         ) -> ScheduledTrees | None:
    """Give the scheduled nodes their tree positions; the step's masks and
    trees."""
    counts = torch.tensor(spec_decode_metadata.num_draft_tokens, dtype=torch.long)
    rows = counts.nonzero().squeeze(1)
    if not len(rows):
        return None
    req_ids = runner.input_batch.req_ids
    proposed = [proposed_trees[req_ids[row]] for row in rows.tolist()]
    tree = scheduled_drafts(
        spec_decode_metadata,
        torch.cat([p.parents[:n] for p, n in zip(proposed, counts[rows].tolist())]),
        torch.cat([p.depths[:n] for p, n in zip(proposed, counts[rows].tolist())]))
    query_ends = torch.as_tensor(runner.query_start_loc.np[1: len(counts) + 1],
                                 dtype=torch.long)
    roots = query_ends[rows] - counts[rows] - 1
    root_positions = runner.positions[roots]
    layout = verification_layout(
        DraftTree(tree.tokens[rows], tree.parents[rows], tree.depths[rows],
                  tree.weights[rows], counts[rows]),
        root_positions)
    tokens = torch.cat([torch.arange(root, root + 1 + count)
                        for root, count in zip(roots.tolist(), counts[rows].tolist())])
    runner.positions[tokens] = layout.positions
    return ScheduledTrees(
        rows=rows, tokens=tokens, prefix_lens=root_positions,
        tree_start_loc=layout.query_start_loc,
        ancestor_masks=ancestor_bitmasks(layout.parents, layout.query_start_loc),
        draft_tree=tree)


def scheduled_drafts(spec_decode_metadata, parents: torch.Tensor | None = None,
                     depths: torch.Tensor | None = None) -> DraftTree:
    """The step's draft tokens as trees, [num_reqs, most drafts]: `parents`
    and `depths` flat in the drafts' order; without them, chains (each
    node's parent is the node before it)."""
    num_nodes = torch.tensor(spec_decode_metadata.num_draft_tokens, dtype=torch.long)
    width = max(int(num_nodes.max()), 1)
    index = torch.arange(width).expand(len(num_nodes), -1)
    valid = index < num_nodes[:, None]

    def padded(flat: torch.Tensor, fill: int) -> torch.Tensor:
        values = torch.full((len(num_nodes), width), fill, dtype=torch.long)
        values[valid] = flat.long()
        return values

    return DraftTree(
        tokens=padded(spec_decode_metadata.draft_token_ids, 0),
        parents=torch.where(valid, index - 1, -1) if parents is None else padded(parents, -1),
        depths=torch.where(valid, index + 1, 0) if depths is None else padded(depths, 0),
        weights=torch.zeros(len(num_nodes), width), num_nodes=num_nodes)


def accept_trees(runner, logits, spec_decode_metadata, tree: DraftTree,
                 trees: ScheduledTrees | None, layers: list, token_buffers: list
                 ) -> SamplerOutput:
    """Draw the target's token at every tree row with vLLM's sampler, follow
    those tokens through each request's tree (exact for sampling too, see
    `accept_path`) and compact the accepted paths. Each output token's
    logprobs are those of the row it was drawn at."""
    num_reqs = runner.input_batch.num_reqs
    rows_per_request = torch.tensor(spec_decode_metadata.num_draft_tokens) + 1
    drawn = runner.sampler(logits, node_sampling_metadata(
        runner.input_batch.sampling_metadata, rows_per_request))
    flat = drawn.sampled_token_ids.view(-1).long()
    width = tree.tokens.shape[1]
    starts = rows_per_request.cumsum(0) - rows_per_request
    columns = torch.minimum(torch.arange(1 + width)[None, :], rows_per_request[:, None] - 1)
    accepted, num_accepted, bonus = accept_path(tree, flat[starts[:, None] + columns])

    on_path = torch.arange(accepted.shape[1])[None, :] < num_accepted[:, None]
    path_tokens = tree.tokens.gather(1, accepted.clamp(min=0))
    sampled = torch.full((num_reqs, width + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    sampled[:, : accepted.shape[1]] = torch.where(on_path, path_tokens,
                                                  PLACEHOLDER_TOKEN_ID).int()
    sampled.scatter_(1, num_accepted[:, None], bonus[:, None].int())

    if trees is not None and bool(num_accepted.any()):
        _compact_accepted_paths(runner, trees, tree, accepted, num_accepted, layers,
                                token_buffers)
    logprobs = drawn.logprobs_tensors
    if logprobs is not None:
        # Output j was drawn at the root's row (j = 0) or at path node j - 1's.
        drawn_at = torch.full((num_reqs, width + 1), -1, dtype=torch.long)
        depth = min(accepted.shape[1], width)
        drawn_at[:, 1: 1 + depth] = accepted[:, :depth]
        rows = (starts[:, None] + 1 + drawn_at).flatten()
        logprobs = LogprobsTensors(logprob_token_ids=logprobs.logprob_token_ids[rows],
                                   logprobs=logprobs.logprobs[rows],
                                   selected_token_ranks=logprobs.selected_token_ranks[rows])
    return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=logprobs)


def _compact_accepted_paths(runner, trees: ScheduledTrees, tree: DraftTree, accepted,
                            num_accepted, layers: list, token_buffers: list) -> None:
    """Accepted nodes to chain slots in every target layer; the step's
    per-token buffers (tokens, positions, captured queries) reordered to
    match."""
    num_reqs = runner.input_batch.num_reqs
    block_table = runner.input_batch.block_table[0].get_device_tensor(num_reqs)
    root_positions = torch.zeros(num_reqs, dtype=torch.long)
    root_positions[trees.rows] = trees.prefix_lens.long()
    source, destination = compaction_moves(accepted, num_accepted, root_positions + 1,
                                           block_table, runner.cache_config.block_size)
    if source.numel():
        for layer, impl in layers:
            impl.compact(layer, layer.kv_cache, source, destination)
        info_first("SpecExtend: moved the first accepted tree nodes to chain slots "
                   "(%d nodes)", source.numel())
    order = accepted_first_order(accepted, num_accepted, tree.num_nodes)
    row_tokens = trees.tree_start_loc.diff()
    roots = trees.tokens[trees.tree_start_loc[:-1]]
    columns = order[trees.rows]
    in_tree = torch.arange(columns.shape[1])[None, :] < row_tokens[:, None]
    new_index = (roots[:, None] + torch.arange(columns.shape[1])[None, :])[in_tree]
    old_index = (roots[:, None] + columns)[in_tree]
    for buffer in token_buffers:
        buffer[new_index] = buffer[old_index]
