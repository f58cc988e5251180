"""Tree mode, target side: verify each request's tree in vLLM's V1 runner.

vLLM schedules a tree's nodes as the request's draft tokens, in topological
order, and computes their slots as for a chain. After `_prepare_inputs`
the nodes' RoPE positions become root + depth and the step's ancestor masks
go to the Hybrid Tree Attention backend. `_sample` is replaced for steps
with drafts: the target's token at every node (argmax, or one sample of
its processed distribution), the path those tokens follow from the root,
the accepted path's K/V moved to the chain slots in every target layer,
and the runner's inputs reordered so vLLM's bookkeeping and the draft's
first pass see the path as an accepted chain.
"""

from __future__ import annotations

import functools
import logging

import torch
from vllm.v1.outputs import LogprobsTensors, SamplerOutput

from vllm_specextend.attention.hybrid_tree_attention import ancestor_bitmasks
from vllm_specextend.tree.compaction import compaction_moves
from vllm_specextend.tree.dynamic_tree import DraftTree, accept_path
from vllm_specextend.tree.verification import accepted_first_order, verification_layout
from vllm_specextend.vllm_glue.proposer import proposer_of
from vllm_specextend.vllm_glue.sampling import node_sampling_metadata
from vllm_specextend.vllm_glue.tree_step import TREE_STATE, ScheduledTrees

logger = logging.getLogger("vllm.specextend")
# Tokens vLLM's bookkeeping drops from a row of sampled ids.
PLACEHOLDER_TOKEN_ID = -1


def _tree_mode(runner) -> bool:
    settings = getattr(runner, "specextend_config", None)
    return settings is not None and settings.tree


def plan_scheduled_trees(runner, spec_decode_metadata) -> ScheduledTrees | None:
    """Give the scheduled nodes their tree positions; the step's masks and
    trees."""
    counts = torch.tensor(spec_decode_metadata.num_draft_tokens, dtype=torch.long)
    rows = counts.nonzero().squeeze(1)
    if not len(rows):
        return None
    req_ids = runner.input_batch.req_ids
    proposed = [TREE_STATE.proposed[req_ids[row]] for row in rows.tolist()]
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
        torch.zeros_like(roots), root_positions)
    tokens = torch.cat([torch.arange(root, root + 1 + count)
                        for root, count in zip(roots.tolist(), counts[rows].tolist())])
    runner.positions[tokens] = layout.positions
    return ScheduledTrees(
        rows=rows, tokens=tokens, prefix_lens=root_positions,
        tree_start_loc=layout.query_start_loc,
        ancestor_masks=ancestor_bitmasks(layout.parents, layout.query_start_loc),
        draft_tree=tree)


def wrap_prepare_inputs(original):
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        result = original(self, scheduler_output, *args, **kwargs)
        _, spec_decode_metadata, _ = result
        if _tree_mode(self) and spec_decode_metadata is not None:
            TREE_STATE.scheduled = plan_scheduled_trees(self, spec_decode_metadata)
        return result

    return _prepare_inputs


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


def _target_layers(runner):
    """(layer, impl) of every target attention layer the HTA backend verifies with."""
    from vllm_specextend.vllm_glue.tree_attention_backend import HybridTreeCPUAttentionImpl

    for layer in runner.compilation_config.static_forward_context.values():
        impl = getattr(layer, "impl", None)
        if isinstance(impl, HybridTreeCPUAttentionImpl) and impl.verifies:
            yield layer, impl


def accept_trees(runner, logits, spec_decode_metadata, tree: DraftTree,
                 trees: ScheduledTrees | None = None) -> SamplerOutput:
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
        _compact_accepted_paths(runner, trees, tree, accepted, num_accepted)
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
                            num_accepted) -> None:
    """Accepted nodes to chain slots in every target layer; the runner's
    tokens, positions and captured queries reordered to match."""
    num_reqs = runner.input_batch.num_reqs
    block_table = runner.input_batch.block_table[0].get_device_tensor(num_reqs)
    root_positions = torch.zeros(num_reqs, dtype=torch.long)
    root_positions[trees.rows] = trees.prefix_lens.long()
    source, destination = compaction_moves(accepted, num_accepted, root_positions + 1,
                                           block_table, runner.cache_config.block_size)
    if source.numel():
        for layer, impl in _target_layers(runner):
            impl.compact(layer, layer.kv_cache, source, destination)
        if not TREE_STATE.logged_first_compaction:
            TREE_STATE.logged_first_compaction = True
            logger.info("SpecExtend: moved the first accepted tree nodes to chain slots "
                        "(%d nodes)", source.numel())
    order = accepted_first_order(accepted, num_accepted, tree.num_nodes)
    row_tokens = trees.tree_start_loc.diff()
    roots = trees.tokens[trees.tree_start_loc[:-1]]
    columns = order[trees.rows]
    in_tree = torch.arange(columns.shape[1])[None, :] < row_tokens[:, None]
    new_index = (roots[:, None] + torch.arange(columns.shape[1])[None, :])[in_tree]
    old_index = (roots[:, None] + columns)[in_tree]
    for buffer in _reordered_buffers(runner):
        buffer[new_index] = buffer[old_index]


def _reordered_buffers(runner):
    yield runner.input_ids.gpu
    yield runner.positions
    retrieval = proposer_of(runner).retrieval
    if retrieval is not None:
        yield retrieval.capture.queries


def wrap_sample(original):
    """Tree mode: accept trees. Chains go to vLLM's own (rejection) sampler."""

    @functools.wraps(original)
    def _sample(self, logits, spec_decode_metadata):
        if not _tree_mode(self) or spec_decode_metadata is None:
            return original(self, logits, spec_decode_metadata)
        trees, TREE_STATE.scheduled = TREE_STATE.scheduled, None
        tree = trees.draft_tree if trees is not None else scheduled_drafts(spec_decode_metadata)
        return accept_trees(self, logits, spec_decode_metadata, tree, trees)

    return _sample
