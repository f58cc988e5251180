"""How a batch of draft trees enters the target's verification pass.

A request whose next token (the root: the bonus token of its last step)
sits at position C schedules the root and its tree's nodes, in topological
order: slot order C, C + 1, ... as for a chain, so vLLM allocates and writes
them unchanged. RoPE positions follow depth instead: the root at C, a node
at depth d at C + d, so every node is verified exactly as the chain of its
path would be. The ancestor masks (root included, as node 0) go to Hybrid
Tree Attention; after acceptance `tree.compaction` moves the accepted path
to the chain slots after the root.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_specextend.attention.hybrid_tree_attention import ancestor_bitmasks, chain_bitmasks
from vllm_specextend.retrieval.draft_rows import concatenated_ranges, query_starts
from vllm_specextend.tree.dynamic_tree import DraftTree, accept_path

# Tokens the engine's bookkeeping drops from a row of sampled ids.
PLACEHOLDER_TOKEN_ID = -1


@dataclass
class ScheduledTrees:
    """A step's rows verified with Hybrid Tree Attention (trees, or chains as
    path-shaped trees), planned once per step and read by every target
    layer."""

    rows: torch.Tensor  # [num_trees] request rows of the batch
    tokens: torch.Tensor  # the rows' scheduled token indices (root, then nodes)
    prefix_lens: torch.Tensor  # [num_trees] cached tokens before each root
    tree_start_loc: torch.Tensor  # [num_trees + 1]
    ancestor_masks: torch.Tensor  # [len(tokens)] int64 bitmask per node
    draft_tree: DraftTree | None = None  # [num_reqs, widest] the scheduled trees


@dataclass
class ProposedTree:
    """A request's drafted tree, nodes in the order they are scheduled."""

    depths: torch.Tensor  # [nodes] 1 for the root's children
    parents: torch.Tensor  # [nodes] local index, -1: the root


@dataclass
class VerificationLayout:
    """The scheduled tokens of one verification pass (each request's root,
    then its tree's nodes), requests one after another."""

    positions: torch.Tensor  # [num_tokens] RoPE positions: root + depth
    parents: torch.Tensor  # [num_tokens] local index (root: -1), for ancestor masks
    query_start_loc: torch.Tensor  # [batch + 1]


def verification_layout(tree: DraftTree, root_positions: torch.Tensor) -> VerificationLayout:
    """Lay out each request's root and its `num_nodes` nodes."""
    batch, nodes = tree.tokens.shape
    device = tree.tokens.device
    # Column 0 is the root; node i moves to column i + 1, its parent with it.
    depths = torch.cat((torch.zeros(batch, 1, dtype=torch.long, device=device), tree.depths), 1)
    parents = torch.cat((torch.full((batch, 1), -1, dtype=torch.long, device=device),
                         tree.parents + 1), dim=1)
    scheduled = torch.arange(nodes + 1, device=device)[None, :] <= tree.num_nodes[:, None]
    counts = tree.num_nodes + 1
    return VerificationLayout(
        positions=(root_positions.long()[:, None] + depths)[scheduled],
        parents=parents[scheduled],
        query_start_loc=torch.cat((counts.new_zeros(1), counts.cumsum(0))),
    )


def accepted_first_order(accepted: torch.Tensor, num_accepted: torch.Tensor,
                         num_nodes: torch.Tensor) -> torch.Tensor:
    """Each request's scheduled tokens (root, then its nodes) reordered so
    that the accepted path follows the root: [batch, 1 + width] column
    indices, the other nodes after the path in their own order, padding last.
    After compaction the accepted tokens sit at these chain positions, so
    the draft's first pass reads them as vLLM reads an accepted chain."""
    batch, depth = accepted.shape
    width = int(num_nodes.max()) if batch else 0
    columns = torch.arange(1 + width, device=accepted.device).expand(batch, -1)
    # Rank: the root 0, path node j at j + 1, the rest after the path.
    rank = (columns + 1 + depth).clone()
    rank[:, 0] = 0
    on_path = torch.arange(depth, device=accepted.device)[None, :] < num_accepted[:, None]
    path_columns = torch.where(on_path, accepted + 1, 0)
    path_ranks = torch.where(on_path, torch.arange(1, depth + 1, device=accepted.device), 0)
    rank = rank.scatter(1, path_columns, path_ranks.expand(batch, -1).contiguous())
    return rank.argsort(dim=1, stable=True)


def tree_mode_refusal(params) -> tuple[str, object] | None:
    """The first sampling parameter a tree cannot serve, with its value:
    penalties, bad words and min_tokens depend on the tokens before a row,
    which differ from branch to branch."""
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                          ("repetition_penalty", 1.0), ("min_tokens", 0)):
        value = getattr(params, name)
        if value != neutral:
            return name, value
    if params.bad_words:
        return "bad_words", params.bad_words
    return None


def chain_rows(num_draft_tokens: np.ndarray, cached_lens: np.ndarray, query_ends: np.ndarray,
               min_prefix_len: int) -> ScheduledTrees | None:
    """The rows verifying chain drafts over prefixes of at least
    `min_prefix_len` cached tokens, as path-shaped trees, from host arrays
    (`query_ends`: where each row's scheduled tokens end)."""
    drafts = np.asarray(num_draft_tokens)
    rows = np.flatnonzero((drafts > 0) & (cached_lens >= min_prefix_len))
    if not len(rows):
        return None
    nodes = drafts[rows] + 1  # the root (last verified token), then the drafts
    roots = query_ends[rows] - nodes
    tokens, _ = concatenated_ranges(roots, nodes)
    local = tokens - np.repeat(roots, nodes)  # each node's index in its chain
    return ScheduledTrees(
        rows=torch.from_numpy(rows), tokens=torch.from_numpy(tokens),
        prefix_lens=torch.from_numpy(cached_lens[rows].astype(np.int64)),
        tree_start_loc=torch.from_numpy(query_starts(nodes)),
        ancestor_masks=chain_bitmasks(torch.from_numpy(local)))


def drafts_as_trees(num_draft_tokens: list[int], draft_token_ids: torch.Tensor,
                    parents: torch.Tensor | None = None,
                    depths: torch.Tensor | None = None) -> DraftTree:
    """A step's draft tokens (flat, request after request) as trees
    [num_reqs, most drafts]: `parents` and `depths` flat in the drafts'
    order; without them, chains (each node's parent is the node before it)."""
    num_nodes = torch.tensor(num_draft_tokens, dtype=torch.long)
    width = max(int(num_nodes.max()), 1)
    index = torch.arange(width).expand(len(num_nodes), -1)
    valid = index < num_nodes[:, None]

    def padded(flat: torch.Tensor, fill: int) -> torch.Tensor:
        values = torch.full((len(num_nodes), width), fill, dtype=torch.long)
        values[valid] = flat.long()
        return values

    return DraftTree(
        tokens=padded(draft_token_ids, 0),
        parents=torch.where(valid, index - 1, -1) if parents is None else padded(parents, -1),
        depths=torch.where(valid, index + 1, 0) if depths is None else padded(depths, 0),
        weights=torch.zeros(len(num_nodes), width), num_nodes=num_nodes)


def plan_trees(proposed_trees: dict[str, ProposedTree], req_ids: list[str],
               num_draft_tokens: list[int], draft_token_ids: torch.Tensor,
               query_ends: torch.Tensor, positions: torch.Tensor
               ) -> tuple[ScheduledTrees, torch.Tensor] | None:
    """The step's tree rows from the trees its requests proposed, and the
    tree positions (root + depth) of their scheduled tokens, which the
    engine scheduled at chain positions (`positions`, per scheduled token;
    `query_ends`: where each row's tokens end). None: no drafts."""
    counts = torch.tensor(num_draft_tokens, dtype=torch.long)
    rows = counts.nonzero().squeeze(1)
    if not len(rows):
        return None
    row_counts = counts[rows].tolist()
    proposed = [proposed_trees[req_ids[row]] for row in rows.tolist()]
    tree = drafts_as_trees(
        num_draft_tokens, draft_token_ids,
        torch.cat([p.parents[:n] for p, n in zip(proposed, row_counts)]),
        torch.cat([p.depths[:n] for p, n in zip(proposed, row_counts)]))
    roots = query_ends[rows] - counts[rows] - 1
    root_positions = positions[roots]
    layout = verification_layout(
        DraftTree(tree.tokens[rows], tree.parents[rows], tree.depths[rows],
                  tree.weights[rows], counts[rows]),
        root_positions)
    tokens = torch.cat([torch.arange(root, root + 1 + count)
                        for root, count in zip(roots.tolist(), row_counts)])
    scheduled = ScheduledTrees(
        rows=rows, tokens=tokens, prefix_lens=root_positions,
        tree_start_loc=layout.query_start_loc,
        ancestor_masks=ancestor_bitmasks(layout.parents, layout.query_start_loc),
        draft_tree=tree)
    return scheduled, layout.positions


@dataclass
class AcceptedTrees:
    """What a verification step accepted of each request's tree."""

    accepted: torch.Tensor  # [num_reqs, depth] path nodes (local index; -1: none)
    num_accepted: torch.Tensor  # [num_reqs]
    # [num_reqs, widest + 1] the output tokens: the path's, then the bonus
    # token; PLACEHOLDER_TOKEN_ID after it.
    sampled: torch.Tensor
    # [num_reqs * (widest + 1)] the drawn row each output token was drawn at
    # (its logprobs' row).
    drawn_rows: torch.Tensor


def accept_drawn(tree: DraftTree, drawn: torch.Tensor,
                 rows_per_request: torch.Tensor) -> AcceptedTrees:
    """Follow the target's tokens, drawn at every row of the step (each
    request's root, then its nodes: `rows_per_request`, flat in `drawn`),
    through each request's tree (`accept_path`)."""
    num_reqs, width = tree.tokens.shape
    starts = rows_per_request.cumsum(0) - rows_per_request
    columns = torch.minimum(torch.arange(1 + width)[None, :], rows_per_request[:, None] - 1)
    accepted, num_accepted, bonus = accept_path(tree, drawn[starts[:, None] + columns])
    on_path = torch.arange(accepted.shape[1])[None, :] < num_accepted[:, None]
    path_tokens = tree.tokens.gather(1, accepted.clamp(min=0))
    sampled = torch.full((num_reqs, width + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    sampled[:, : accepted.shape[1]] = torch.where(on_path, path_tokens,
                                                  PLACEHOLDER_TOKEN_ID).int()
    sampled.scatter_(1, num_accepted[:, None], bonus[:, None].int())
    # Output j was drawn at the root's row (j = 0) or at path node j - 1's.
    drawn_at = torch.full((num_reqs, width + 1), -1, dtype=torch.long)
    depth = min(accepted.shape[1], width)
    drawn_at[:, 1: 1 + depth] = accepted[:, :depth]
    return AcceptedTrees(accepted, num_accepted, sampled,
                         (starts[:, None] + 1 + drawn_at).flatten())


def accepted_first_moves(trees: ScheduledTrees, accepted: AcceptedTrees,
                         num_nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(new, old) token indices reordering the step's per-token buffers so
    each accepted path follows its root (`accepted_first_order`)."""
    order = accepted_first_order(accepted.accepted, accepted.num_accepted, num_nodes)
    row_tokens = trees.tree_start_loc.diff()
    roots = trees.tokens[trees.tree_start_loc[:-1]]
    columns = order[trees.rows]
    in_tree = torch.arange(columns.shape[1])[None, :] < row_tokens[:, None]
    new_index = (roots[:, None] + torch.arange(columns.shape[1])[None, :])[in_tree]
    old_index = (roots[:, None] + columns)[in_tree]
    return new_index, old_index
