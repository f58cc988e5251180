"""The draft's attention while it grows a tree (kernel under
TRITON_INTERPRET=1 and the CPU path vs the PyTorch reference), and the
property that makes tree drafting match chain drafting: a node attends
exactly as the last query of the chain of its path does (causal attention
over context + path, computed here with SDPA)."""

import pytest
import torch
import torch.nn.functional as F

from vllm_specextend.attention.draft_tree_attention import (
    draft_tree_attention,
    draft_tree_attention_cpu,
    draft_tree_attention_reference,
)


def tree_inputs(context_lens, nodes_per_request, max_depth, num_heads, num_kv_heads,
                head_dim, dtype, seed=0):
    """Random contexts (padded past their lengths) and paths; nodes of one
    request at mixed depths."""
    generator = torch.Generator().manual_seed(seed)
    num_queries = sum(nodes_per_request)
    path_lens = torch.randint(1, max_depth + 1, (num_queries,), generator=generator)
    path_lens[0] = max_depth

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    context = (len(context_lens), max(context_lens), num_kv_heads, head_dim)
    path = (num_queries, max_depth, num_kv_heads, head_dim)
    return dict(
        query=random(num_queries, num_heads, head_dim),
        context_keys=random(*context), context_values=random(*context),
        context_lens=torch.tensor(context_lens),
        query_start_loc=torch.tensor([0] + nodes_per_request).cumsum(0),
        path_keys=random(*path), path_values=random(*path), path_lens=path_lens)


@pytest.mark.parametrize(
    "context_lens,nodes_per_request,max_depth,num_heads,num_kv_heads,dtype", [
        # a bare root; a request with no nodes
        ([1, 37, 100], [3, 0, 5], 4, 14, 2, torch.float32),
        ([1, 37, 100], [3, 0, 5], 4, 4, 4, torch.bfloat16),
        ([90, 40], [6, 5], 10, 14, 2, torch.bfloat16),  # contexts over several blocks
        ([90, 40], [6, 5], 10, 4, 4, torch.float32),
        ([64], [1], 1, 14, 2, torch.float32),
    ])
def test_kernel_and_cpu_path_match_reference(context_lens, nodes_per_request, max_depth,
                                             num_heads, num_kv_heads, dtype):
    inputs = tree_inputs(context_lens, nodes_per_request, max_depth, num_heads,
                         num_kv_heads, 64, dtype)
    expected, expected_lse = draft_tree_attention_reference(**inputs)
    out, lse = draft_tree_attention(**inputs)
    cpu = draft_tree_attention_cpu(**inputs)
    tolerance = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4,
                                                                               rtol=1e-4)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)
    torch.testing.assert_close(cpu.float(), expected.float(), **tolerance)
    torch.testing.assert_close(lse, expected_lse, atol=1e-3, rtol=1e-3)


def test_a_node_attends_as_the_chain_of_its_path():
    """The node's output equals the last query of causal attention over its
    context followed by its path; another branch's path changes it."""
    num_heads, num_kv_heads, head_dim, context_len, depth = 6, 2, 64, 80, 5
    inputs = tree_inputs([context_len], [1], depth, num_heads, num_kv_heads, head_dim,
                         torch.float32, seed=1)
    tree_out, _ = draft_tree_attention_reference(**inputs)
    keys = torch.cat((inputs["context_keys"][0], inputs["path_keys"][0]))
    values = torch.cat((inputs["context_values"][0], inputs["path_values"][0]))
    # [heads, 1 query, dim] against [kv_heads, keys, dim]: the chain's last query.
    chain_out = F.scaled_dot_product_attention(
        inputs["query"].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
        enable_gqa=True)
    torch.testing.assert_close(tree_out, chain_out.transpose(0, 1), atol=1e-5, rtol=1e-5)
    other_branch = dict(inputs, path_keys=inputs["path_keys"].flip(1))
    other_out, _ = draft_tree_attention_reference(**other_branch)
    assert not torch.allclose(other_out, tree_out, atol=1e-3)
