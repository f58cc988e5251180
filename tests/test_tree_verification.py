"""A batch of draft trees laid out for the target's verification pass: slots
in topological order, RoPE positions by depth, parents shifted under the
root; verified with Hybrid Tree Attention, every node gets exactly the
attention the chain of its path would get."""

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
