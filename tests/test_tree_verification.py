"""A batch of draft trees laid out for the target's verification pass: slots
in topological order, RoPE positions by depth, parents shifted under the
root; verified with Hybrid Tree Attention, every node gets exactly the
attention the chain of its path would get."""

import numpy as np
import torch

from kernel_inputs import random_block_table
from test_working_cache_layout import rope_cache, rotate_at
from vllm_specextend.attention.hybrid_tree_attention import (
    ancestor_bitmasks,
    hybrid_tree_attention_cpu,
    tree_attention_reference,
)
from vllm_specextend.paged_cache import slots_of
from vllm_specextend.tree.dynamic_tree import DraftTree, DynamicTreeBuilder
from vllm_specextend.tree.verification import verification_layout


def test_layout_of_a_hand_made_batch():
    tree = DraftTree(tokens=torch.tensor([[5, 6, 7], [9, 0, 0]]),
                     parents=torch.tensor([[-1, 0, 0], [-1, -1, -1]]),
                     depths=torch.tensor([[1, 2, 2], [1, 0, 0]]),
                     weights=torch.tensor([[0.9, 0.5, 0.3], [0.8, 0.0, 0.0]]),
                     num_nodes=torch.tensor([3, 1]))
    layout = verification_layout(tree, torch.tensor([10, 20]))
    assert layout.positions.tolist() == [10, 11, 12, 12, 20, 21]
    assert layout.parents.tolist() == [-1, 0, 1, 1, -1, 0]
    assert layout.query_start_loc.tolist() == [0, 4, 6]


def test_each_node_is_verified_as_the_chain_of_its_path():
    torch.manual_seed(0)
    builder = DynamicTreeBuilder(1, nodes=10, max_depth=4, threshold=-1.0)
    while not builder.done():
        width = builder.frontier_weights().shape[1]
        builder.add_layer(torch.rand(1, width, 6).softmax(dim=-1))
    tree = builder.finish()
    prefix_len, block_size, num_heads, num_kv_heads, head_dim = 37, 16, 4, 2, 32
    layout = verification_layout(tree, torch.tensor([prefix_len]))
    nodes = len(layout.positions)
    cos_sin = rope_cache(128, head_dim)
    table, num_blocks = random_block_table([prefix_len + nodes], block_size)
    prefix_keys = torch.randn(prefix_len, num_kv_heads, head_dim)
    prefix_values = torch.randn(prefix_len, num_kv_heads, head_dim)
    # Un-rotated projections of the root and each node; RoPE at its position.
    node_keys = torch.randn(nodes, num_kv_heads, head_dim)
    node_values = torch.randn(nodes, num_kv_heads, head_dim)
    node_queries = torch.randn(nodes, num_heads, head_dim)

    def attend(order, positions):
        """Prefix + the given nodes (at slots after the prefix, rotated at
        `positions`) under their ancestor masks: the dense reference and HTA."""
        n = len(order)
        key_cache = torch.zeros(num_blocks * block_size, num_kv_heads, head_dim)
        value_cache = torch.zeros_like(key_cache)
        slots = slots_of(table[0], torch.arange(prefix_len + n), block_size)
        all_positions = torch.cat((torch.arange(prefix_len), positions))
        key_cache[slots] = rotate_at(torch.cat((prefix_keys, node_keys[order])), all_positions,
                                  cos_sin)
        value_cache[slots] = torch.cat((prefix_values, node_values[order]))
        local = {int(node): i for i, node in enumerate(order)}
        parents = torch.tensor([local.get(int(layout.parents[node]), -1) for node in order])
        tree_start_loc = torch.tensor([0, n])
        query = rotate_at(node_queries[order], positions, cos_sin)
        tree = (table, torch.tensor([prefix_len]), tree_start_loc,
                ancestor_bitmasks(parents, tree_start_loc), block_size)
        return (tree_attention_reference(query, key_cache, value_cache, *tree),
                hybrid_tree_attention_cpu(
                    query, lambda slots: (key_cache[slots], value_cache[slots]), *tree,
                    split_len=16))

    everything = torch.arange(nodes)
    tree_out, tree_hta = attend(everything, layout.positions)
    torch.testing.assert_close(tree_hta, tree_out, atol=1e-5, rtol=1e-5)
    for node in range(nodes):
        path = [node]
        while layout.parents[path[-1]] >= 0:
            path.append(int(layout.parents[path[-1]]))
        path = torch.tensor(path[::-1])
        chain_out, _ = attend(path, prefix_len + torch.arange(len(path)))
        torch.testing.assert_close(tree_out[node], chain_out[-1], atol=1e-5, rtol=1e-5)


def test_accepted_path_moves_right_after_the_root():
    """Columns (0: root, 1 + i: node i) in the order the draft's first pass
    and vLLM's bookkeeping read them: root, accepted path, the rest."""
    from vllm_specextend.tree.verification import accepted_first_order

    accepted = torch.tensor([[1, 4, -1], [-1, -1, -1], [0, -1, -1]])
    order = accepted_first_order(accepted, torch.tensor([2, 0, 1]), torch.tensor([5, 2, 1]))
    assert order[0].tolist() == [0, 2, 5, 1, 3, 4]
    assert order[1].tolist() == [0, 1, 2, 3, 4, 5]
    assert order[2].tolist() == [0, 1, 2, 3, 4, 5]


def test_chain_rows_are_path_shaped_trees_over_long_prefixes():
    """Rows with drafts and a prefix of at least min_prefix_len: each root
    (the last verified token) and its drafts, every node over all before it."""
    from vllm_specextend.attention.hybrid_tree_attention import chain_bitmasks
    from vllm_specextend.tree.verification import chain_rows

    drafts = np.array([2, 0, 3, 1])
    cached = np.array([500, 900, 80, 700])
    query_ends = np.array([3, 4, 8, 10])
    rows = chain_rows(drafts, cached, query_ends, min_prefix_len=100)
    assert rows.rows.tolist() == [0, 3]
    assert rows.tokens.tolist() == [0, 1, 2, 8, 9]
    assert rows.prefix_lens.tolist() == [500, 700]
    assert rows.tree_start_loc.tolist() == [0, 3, 5]
    assert rows.ancestor_masks.tolist() == chain_bitmasks(torch.tensor([0, 1, 2, 0, 1])).tolist()
    assert chain_rows(drafts, cached, query_ends, min_prefix_len=1000) is None


def test_planned_trees_get_tree_positions_and_their_requests_trees():
    """Two requests, one tree each (a root's two children, then a grandchild),
    one without drafts: nodes at root + depth, trees from what each proposed."""
    from vllm_specextend.tree.verification import ProposedTree, plan_trees

    proposed = {"a": ProposedTree(depths=torch.tensor([1, 1, 2]),
                                  parents=torch.tensor([-1, -1, 0])),
                "c": ProposedTree(depths=torch.tensor([1, 2]), parents=torch.tensor([-1, 0]))}
    # Scheduled tokens: a's root + 3 nodes, b's root, c's root + 2 nodes,
    # at chain positions from each root's.
    positions = torch.tensor([40, 41, 42, 43, 7, 90, 91, 92])
    planned = plan_trees(proposed, ["a", "b", "c"], [3, 0, 2],
                         torch.tensor([11, 12, 13, 21, 22]), torch.tensor([4, 5, 8]), positions)
    trees, tree_positions = planned
    assert trees.rows.tolist() == [0, 2]
    assert trees.tokens.tolist() == [0, 1, 2, 3, 5, 6, 7]
    assert tree_positions.tolist() == [40, 41, 41, 42, 90, 91, 92]
    assert trees.prefix_lens.tolist() == [40, 90]
    assert trees.draft_tree.parents[0].tolist() == [-1, -1, 0]
    assert trees.draft_tree.tokens[2, :2].tolist() == [21, 22]
    assert plan_trees(proposed, ["a"], [0], torch.tensor([]), torch.tensor([1]),
                      positions) is None


def test_accepting_drawn_tokens_gives_path_bonus_and_logprob_rows():
    """Request 0: root's target token 7 matches node 1 (a root child), its
    token 9 matches node 2 (1's child); the bonus is drawn at node 2.
    Request 1: a chain whose first draft is rejected."""
    from vllm_specextend.tree.verification import (
        PLACEHOLDER_TOKEN_ID,
        accept_drawn,
        drafts_as_trees,
    )

    tree = drafts_as_trees([3, 2], torch.tensor([5, 7, 9, 4, 6]),
                           torch.tensor([-1, -1, 1, -1, 0]), torch.tensor([1, 1, 2, 1, 2]))
    # Drawn at: request 0's root, nodes 0..2; request 1's root, nodes 0..1.
    drawn = torch.tensor([7, 1, 9, 3, 8, 2, 2])
    accepted = accept_drawn(tree, drawn, torch.tensor([4, 3]))
    assert accepted.num_accepted.tolist() == [2, 0]
    assert accepted.accepted[0, :2].tolist() == [1, 2]
    p = PLACEHOLDER_TOKEN_ID
    assert accepted.sampled.tolist() == [[7, 9, 3, p], [8, p, p, p]]
    # Output j drawn at the root (row start) or path node j - 1 (start + 1 + node).
    assert accepted.drawn_rows.view(2, 4)[0, :3].tolist() == [0, 2, 3]
    assert accepted.drawn_rows.view(2, 4)[1, 0].tolist() == 4


def test_buffers_move_so_each_accepted_path_follows_its_root():
    from vllm_specextend.tree.verification import (
        AcceptedTrees,
        ScheduledTrees,
        accepted_first_moves,
    )

    # One tree row at tokens 10..13 (root, 3 nodes); path: node 2.
    trees = ScheduledTrees(rows=torch.tensor([0]), tokens=torch.arange(10, 14),
                           prefix_lens=torch.tensor([50]), tree_start_loc=torch.tensor([0, 4]),
                           ancestor_masks=torch.zeros(4, dtype=torch.long))
    accepted = AcceptedTrees(accepted=torch.tensor([[2, -1]]), num_accepted=torch.tensor([1]),
                             sampled=torch.empty(0), drawn_rows=torch.empty(0))
    new_index, old_index = accepted_first_moves(trees, accepted, torch.tensor([3]))
    buffer = torch.arange(20)
    buffer[new_index] = buffer[old_index]
    assert buffer[10:14].tolist() == [10, 13, 11, 12]
