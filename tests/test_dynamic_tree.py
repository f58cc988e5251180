"""Dynamic draft trees on hand-made draft distributions: closed under
ancestors, weights the product of probabilities along the path, node budget
and depth respected, the stop rule as specified; tree acceptance, greedy and
sampled (the output keeps the target's distribution)."""


import pytest
import torch

from vllm_specextend.tree.dynamic_tree import (
    DraftTree,
    DynamicTreeBuilder,
    accept_path,
    grow_tree,
)


def grow(builder, layer_probs):
    """Drive the builder with one [batch, width, vocab] table per layer
    (each frontier slot's distribution); returns the tree."""
    for probs in layer_probs:
        builder.add_layer(probs[:, : builder.frontier_weights().shape[1]])
        if builder.done():
            break
    return builder.finish()


def reference_tree(layer_probs, request, nodes, max_depth, threshold):
    """The algorithm in plain Python over paths: {path of tokens: weight}."""
    frontier = [((), 1.0)]
    pool, expected = [], 0.0
    for depth in range(max_depth):
        probs = layer_probs[depth][request]
        candidates = [(path + (token,), weight * float(probs[slot, token]))
                      for slot, (path, weight) in enumerate(frontier)
                      for token in range(probs.shape[1])]
        candidates.sort(key=lambda c: -c[1])
        frontier = candidates[:nodes]
        pool += frontier
        best = sum(sorted((w for _, w in pool), reverse=True)[:nodes])
        gain, expected = best - expected, best
        if gain <= threshold:
            break
    chosen = sorted(pool, key=lambda c: (-c[1], len(c[0])))[:nodes]
    return {path: weight for path, weight in chosen if weight > 0}


def paths_of(tree: DraftTree, request: int) -> dict:
    out = {}
    tokens, parents = tree.tokens[request].tolist(), tree.parents[request].tolist()
    for node in range(int(tree.num_nodes[request])):
        path, walk = [], node
        while walk >= 0:
            path.append(tokens[walk])
            walk = parents[walk]
        out[tuple(reversed(path))] = float(tree.weights[request, node])
    return out


def random_layers(batch, nodes, vocab, depth, seed, sharpness=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(batch, nodes, vocab, generator=gen) * sharpness, -1)
            for _ in range(depth)]


@pytest.mark.parametrize("nodes,vocab,max_depth,threshold",
                         [(10, 8, 5, 0.0), (6, 3, 10, 0.05), (50, 16, 10, 0.7), (4, 2, 3, 0.0)])
def test_tree_matches_reference_and_invariants(nodes, vocab, max_depth, threshold):
    batch = 4
    layers = random_layers(batch, nodes, vocab, max_depth, seed=nodes * vocab)
    tree = grow(DynamicTreeBuilder(batch, nodes, max_depth, threshold), layers)
    for request in range(batch):
        expected = reference_tree(layers, request, nodes, max_depth, threshold)
        got = paths_of(tree, request)
        assert got.keys() == expected.keys()
        for path, weight in got.items():
            assert weight == pytest.approx(expected[path], rel=1e-5)
        count = int(tree.num_nodes[request])
        assert count <= nodes
        parents = tree.parents[request, :count]
        depths = tree.depths[request, :count]
        weights = tree.weights[request, :count]
        assert int(depths.max()) <= max_depth
        for node in range(count):
            parent = int(parents[node])
            # Closed under ancestors, parents first, depth and weight monotone.
            assert -1 <= parent < node
            if parent >= 0:
                assert depths[node] == depths[parent] + 1
                assert weights[node] <= weights[parent]
            else:
                assert depths[node] == 1


def test_stop_rule_on_flat_distributions():
    """Two equally likely tokens everywhere, 2 nodes: layer 1 brings the
    expected length from 0 to 1.0 (> 0.7: grow), layer 2 adds nothing (the
    best two weights are still 0.5 + 0.5): stop at depth 2."""
    flat = torch.full((1, 2, 2), 0.5)
    builder = DynamicTreeBuilder(1, nodes=2, max_depth=10, threshold=0.7)
    builder.add_layer(flat[:, :1])
    assert not builder.done() and builder.expected_length.item() == pytest.approx(1.0)
    builder.add_layer(flat)
    assert builder.done() and builder.depth == 2
    tree = builder.finish()
    assert tree.depths[0].tolist() == [1, 1] and tree.parents[0].tolist() == [-1, -1]


def test_requests_stop_independently_and_max_depth_holds():
    sure = torch.zeros(2, 3, 4)
    sure[..., 1] = 1.0  # every draft distribution certain: each layer adds 1
    sure[1] = 0.25  # request 1 is flat: its second layer gains less than 0.5
    builder = DynamicTreeBuilder(2, nodes=3, max_depth=4, threshold=0.5)
    tree = grow(builder, [sure] * 10)
    assert builder.depth == 4
    assert tree.depths[0, : int(tree.num_nodes[0])].tolist() == [1, 2, 3]  # a chain
    assert tree.tokens[0, :3].tolist() == [1, 1, 1]
    assert int(tree.depths[1].max()) == 1  # stopped after layer 2 added nothing


def test_accept_path_follows_target_argmax():
    # Root children: tokens 5 (node 0), 7 (node 1); node 2 (token 9) under
    # node 1; node 3 (token 4) under node 2.
    tree = DraftTree(tokens=torch.tensor([[5, 7, 9, 4], [5, 7, 9, 4]]),
                     parents=torch.tensor([[-1, -1, 1, 2], [-1, -1, 1, 2]]),
                     depths=torch.tensor([[1, 1, 2, 3], [1, 1, 2, 3]]),
                     weights=torch.ones(2, 4), num_nodes=torch.tensor([4, 4]))
    # Columns: root, node 0..3.
    target = torch.tensor([[7, 0, 9, 4, 11],   # 7 -> 9 -> 4, bonus 11
                           [8, 0, 9, 4, 11]])  # nothing accepted, bonus 8
    accepted, count, bonus = accept_path(tree, target)
    assert count.tolist() == [3, 0]
    assert accepted[0].tolist() == [1, 2, 3] and accepted[1].tolist() == [-1, -1, -1]
    assert bonus.tolist() == [11, 8]


def test_accept_path_ignores_padding_nodes():
    tree = DraftTree(tokens=torch.tensor([[3, 0]]), parents=torch.tensor([[-1, -1]]),
                     depths=torch.tensor([[1, 0]]), weights=torch.tensor([[1.0, 0.0]]),
                     num_nodes=torch.tensor([1]))
    accepted, count, bonus = accept_path(tree, torch.tensor([[0, 6, 6]]))
    assert count.tolist() == [0] and bonus.tolist() == [0]


def test_sampled_acceptance_keeps_the_target_distribution():
    """Root children hold tokens 0 and 1 (node 1 has child token 2); the
    target's distribution at the root is p. Over many draws the first output
    token (accepted child, else the bonus) follows p: chi-square at 5 dof."""
    torch.manual_seed(0)
    p = torch.tensor([0.35, 0.05, 0.25, 0.1, 0.2, 0.05])
    draws = 20000
    tree = DraftTree(tokens=torch.tensor([[0, 1, 2]]).expand(draws, -1),
                     parents=torch.tensor([[-1, -1, 1]]).expand(draws, -1),
                     depths=torch.tensor([[1, 1, 2]]).expand(draws, -1),
                     weights=torch.ones(draws, 3), num_nodes=torch.full((draws,), 3))
    # One sample of the target at the root and at each node.
    samples = torch.multinomial(p, draws * 4, replacement=True).view(draws, 4)
    accepted, count, bonus = accept_path(tree, samples)
    first = torch.where(count > 0, tree.tokens.gather(1, accepted[:, :1].clamp(min=0)).squeeze(1),
                        bonus)
    observed = torch.bincount(first, minlength=6).double()
    expected = p.double() * draws
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 20.5  # p = 0.001 at 5 degrees of freedom
    # The drafts are used: token 1 is accepted whenever the root sample is 1.
    assert bool((count[samples[:, 0] == 1] >= 1).all())


def test_grown_trees_give_each_node_its_path_of_scratch_rows():
    """`grow_tree` runs one draft layer per depth; each node's path is its
    ancestors' scratch rows then its own, and no two nodes of a step share
    a row."""
    torch.manual_seed(3)
    batch, nodes, vocab, max_depth = 2, 4, 5, 4
    builder = DynamicTreeBuilder(batch, nodes, max_depth=max_depth, threshold=-1.0)
    seen = []

    def draft_layer(depth, tokens, node_rows, paths):
        assert tokens.shape == node_rows.shape == (batch, nodes)
        assert paths.shape == (batch, nodes, depth)
        seen.append((node_rows, paths))
        return torch.rand(batch, nodes, vocab).softmax(dim=-1)

    grow_tree(builder, torch.rand(batch, vocab).softmax(dim=-1), draft_layer)
    assert len(seen) == max_depth - 1
    all_rows = torch.cat([rows.flatten() for rows, _ in seen])
    assert len(set(all_rows.tolist())) == len(all_rows)
    # Pool index -> scratch row: the builder's pool and the scratch rows use
    # the same (depth, node) blocks.
    parents = torch.cat(builder.parents, dim=1)
    for depth, (rows, paths) in enumerate(seen, start=1):
        for request in range(batch):
            for local in range(nodes):
                node, chain = (depth - 1) * nodes + local, []
                while node >= 0:
                    chain.append(node)
                    node = int(parents[request, node])
                base = request * max_depth * nodes
                assert paths[request, local].tolist() == [base + n for n in chain[::-1]]
