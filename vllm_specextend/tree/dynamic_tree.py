"""Dynamic draft trees (OPT-Tree style, SpecExtend's tree setting), batched.

The root is a request's last accepted token. Depth by depth the draft
scores the children of the newest layer's nodes; a node's weight is the
product of draft probabilities along its path, and each layer keeps its
`nodes` heaviest candidates (parents recorded). The expected accepted length
is the sum of the `nodes` heaviest weights over all layers so far; a request
stops growing when a layer raises it by no more than `threshold`, or at
`max_depth`. Its tree is then its `nodes` heaviest candidates over all
layers. A child weighs no more than its parent and comes from a later layer,
so ranking by weight, earlier layers first on ties, keeps the tree closed
under ancestors.

Node indices are local to a request; -1 as a parent is the root.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """Each request's tree, nodes in topological order (by depth)."""

    tokens: torch.Tensor  # [batch, nodes] int64; padding: 0
    parents: torch.Tensor  # [batch, nodes] int64 local index; -1: the root
    depths: torch.Tensor  # [batch, nodes] int64, 1 for the root's children
    weights: torch.Tensor  # [batch, nodes] float32; padding: 0
    num_nodes: torch.Tensor  # [batch] int64


class DynamicTreeBuilder:
    """Grows a batch of trees one layer per draft forward."""

    def __init__(self, batch: int, nodes: int, max_depth: int, threshold: float, device=None):
        self.nodes, self.max_depth, self.threshold = nodes, max_depth, threshold
        self.device = device
        # Candidate pool, one block of `nodes` entries per layer.
        self.tokens: list[torch.Tensor] = []
        self.parents: list[torch.Tensor] = []  # index into the pool
        self.weights: list[torch.Tensor] = []
        # For the newest layer: each node's parent as an index into the
        # layer before (0: the root, for the first layer).
        self.frontier_parents: torch.Tensor | None = None
        self.expected_length = torch.zeros(batch, device=device)
        self.growing = torch.ones(batch, dtype=torch.bool, device=device)

    @property
    def depth(self) -> int:
        return len(self.weights)

    def frontier_weights(self) -> torch.Tensor:
        """[batch, width] weights of the nodes whose children come next."""
        if not self.weights:
            return torch.ones(self.growing.shape[0], 1, device=self.device)
        return self.weights[-1]

    def add_layer(self, draft_probs: torch.Tensor) -> torch.Tensor:
        """Take the draft's next-token probabilities at every frontier node,
        [batch, width, vocab]; keep the layer's heaviest candidates. Returns
        their tokens [batch, nodes], the next frontier (weight 0: not grown)."""
        batch, width, vocab = draft_probs.shape
        candidates = self.frontier_weights()[:, :, None] * draft_probs.float()
        candidates = candidates.masked_fill(~self.growing[:, None, None], 0.0)
        keep = min(self.nodes, width * vocab)
        weights, flat = candidates.view(batch, -1).topk(keep, dim=1)
        tokens, frontier_index = flat % vocab, flat // vocab
        if keep < self.nodes:  # tiny vocabularies: pad the layer's block
            pad = self.nodes - keep
            weights = torch.nn.functional.pad(weights, (0, pad))
            tokens = torch.nn.functional.pad(tokens, (0, pad))
            frontier_index = torch.nn.functional.pad(frontier_index, (0, pad))
        layer_start = (self.depth - 1) * self.nodes
        parents = frontier_index + layer_start if self.depth else torch.full_like(tokens, -1)
        self.frontier_parents = frontier_index
        self.tokens.append(tokens)
        self.parents.append(parents)
        self.weights.append(weights)
        best = torch.cat(self.weights, dim=1).topk(self.nodes, dim=1).values.sum(dim=1)
        gain = best - self.expected_length
        self.expected_length = torch.where(self.growing, best, self.expected_length)
        self.growing &= gain > self.threshold
        return tokens

    def done(self) -> bool:
        return self.depth >= self.max_depth or not bool(self.growing.any())

    def finish(self) -> DraftTree:
        weights = torch.cat(self.weights, dim=1)
        tokens, parents = torch.cat(self.tokens, dim=1), torch.cat(self.parents, dim=1)
        depths = torch.arange(1, self.depth + 1, device=weights.device).repeat_interleave(
            self.nodes).expand_as(weights)
        # Heaviest first, earlier layers first among equals (stable sort).
        order = torch.sort(-weights, dim=1, stable=True).indices[:, : self.nodes]
        chosen = torch.zeros_like(weights, dtype=torch.bool).scatter_(1, order, True)
        chosen &= weights > 0
        num_nodes = chosen.sum(dim=1)
        # Topological order: chosen entries in pool order (layer by layer).
        pool_order = torch.sort((~chosen).to(torch.int8), dim=1, stable=True).indices
        pool_order = pool_order[:, : self.nodes]
        local_of_pool = torch.full_like(weights, -1, dtype=torch.long)
        local_of_pool.scatter_(1, pool_order, torch.arange(
            self.nodes, device=weights.device).expand_as(pool_order))
        pool_parent = parents.gather(1, pool_order)
        local_parent = torch.where(
            pool_parent >= 0, local_of_pool.gather(1, pool_parent.clamp(min=0)), -1)
        valid = torch.arange(self.nodes, device=weights.device)[None, :] < num_nodes[:, None]
        return DraftTree(
            tokens=torch.where(valid, tokens.gather(1, pool_order), 0),
            parents=torch.where(valid, local_parent, -1),
            depths=torch.where(valid, depths.gather(1, pool_order), 0),
            weights=torch.where(valid, weights.gather(1, pool_order), 0.0),
            num_nodes=num_nodes,
        )


def child_paths(parent_paths: torch.Tensor, frontier_parents: torch.Tensor,
                child_slots: torch.Tensor) -> torch.Tensor:
    """The paths of a new layer's nodes, for the draft's next tree forward:
    `parent_paths` [batch, width, depth - 1] holds the previous layer's paths
    (slots of depths 1..depth-1; [batch, 1, 0] at the root), `frontier_parents`
    [batch, nodes] each new node's parent in it, `child_slots` [batch, nodes]
    the new nodes' own slots. Returns [batch, nodes, depth]."""
    gathered = parent_paths.gather(
        1, frontier_parents[:, :, None].expand(-1, -1, parent_paths.shape[2]))
    return torch.cat((gathered, child_slots[:, :, None]), dim=2)


def grow_tree(builder: DynamicTreeBuilder, root_probs: torch.Tensor, draft_layer) -> DraftTree:
    """Grow every request's tree, one draft forward per layer. `root_probs`
    [batch, vocab]: the draft's distribution after each root.
    `draft_layer(depth, tokens, node_rows, paths)` runs the draft on the
    newest layer's nodes: their tokens [batch, nodes], the scratch rows
    their keys and values go to (one block of `nodes` rows per request and
    depth) and each node's path of scratch rows, depth 1 to itself
    [batch, nodes, depth]; it returns their next-token probabilities
    [batch, nodes, vocab]."""
    batch, nodes, device = root_probs.shape[0], builder.nodes, root_probs.device
    request_base = torch.arange(batch, device=device)[:, None] * (builder.max_depth * nodes)
    tokens = builder.add_layer(root_probs[:, None, :])
    paths = torch.empty(batch, 1, 0, dtype=torch.long, device=device)
    while not builder.done():
        depth = builder.depth
        node_rows = request_base + (depth - 1) * nodes + torch.arange(nodes, device=device)
        paths = child_paths(paths, builder.frontier_parents, node_rows)
        tokens = builder.add_layer(draft_layer(depth, tokens, node_rows, paths))
    return builder.finish()


def accept_path(tree: DraftTree, target_tokens: torch.Tensor):
    """Verification: from the root, move to the child whose token is the
    target's token at the current node while one exists.

    `target_tokens` [batch, 1 + nodes] holds the target's token at the root
    (column 0) and at each node (column 1 + local index): its argmax under
    greedy decoding, or one sample of its processed distribution (temperature,
    top-k, top-p) under sampling. With sampling this is exact: the candidates
    are fixed, not drawn from the draft, so rejection sampling with the draft
    as a point mass on each child in turn accepts child c with probability
    p(c) and otherwise samples the residual, which is the same as drawing one
    token from p and following it if it is a child. Returns the accepted
    nodes [batch, max_depth] (local indices in path order, padding -1), their
    count [batch], and the bonus token [batch] (the target's token at the
    last accepted node)."""
    batch, nodes = tree.tokens.shape
    device = tree.tokens.device
    max_depth = int(tree.depths.max()) if tree.depths.numel() else 0
    valid = torch.arange(nodes, device=device)[None, :] < tree.num_nodes[:, None]
    current = torch.full((batch,), -1, dtype=torch.long, device=device)
    accepted = torch.full((batch, max(max_depth, 1)), -1, dtype=torch.long, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=device)
    for step in range(max_depth):
        wanted = target_tokens.gather(1, (current + 1)[:, None])
        match = valid & (tree.parents == current[:, None]) & (tree.tokens == wanted)
        found = match.any(dim=1)
        child = match.long().argmax(dim=1)  # siblings hold distinct tokens
        current = torch.where(found, child, current)
        accepted[:, step] = torch.where(found, child, -1)
        num_accepted += found.long()
    bonus = target_tokens.gather(1, (current + 1)[:, None]).squeeze(1)
    return accepted, num_accepted, bonus
