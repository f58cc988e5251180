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

import torch

from vllm_specextend.tree.dynamic_tree import DraftTree


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
