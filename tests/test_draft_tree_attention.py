"""The draft's attention while it grows a tree (kernel under
TRITON_INTERPRET=1 and the CPU path vs the PyTorch reference), and the
property that makes tree drafting match chain drafting: a node attends
exactly as working-set attention does for the chain of its path."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernel_inputs import random_block_table  # noqa: E402
from test_working_set import rope_cache  # noqa: E402
from vllm_specextend.attention.draft_tree_attention import (  # noqa: E402
    draft_tree_attention,
    draft_tree_attention_cpu,
    draft_tree_attention_reference,
)
from vllm_specextend.attention.working_set_attention import (  # noqa: E402
    working_set_attention_reference,
)
from vllm_specextend.paged_cache import slots_of  # noqa: E402


def tree_inputs(context_lens, nodes_per_request, max_depth, num_heads, num_kv_heads,
                head_dim, dtype, seed=0):
    """Random mirrors; each request's context and its nodes' paths on
    distinct random slots; nodes of one request at mixed depths."""
    generator = torch.Generator().manual_seed(seed)
    num_queries = sum(nodes_per_request)
    num_slots = sum(context_lens) + num_queries * max_depth + 7
    order = torch.randperm(num_slots, generator=generator)
    context_slots = torch.zeros(len(context_lens), max(context_lens), dtype=torch.long)
    for row, m in enumerate(context_lens):
        context_slots[row, :m] = order[:m]
        order = order[m:]
    path_slots = order[: num_queries * max_depth].view(num_queries, max_depth).clone()
    path_lens = torch.randint(1, max_depth + 1, (num_queries,), generator=generator)
    path_lens[0] = max_depth
    return dict(
        query=torch.randn(num_queries, num_heads, head_dim, generator=generator).to(dtype),
        key_mirror=torch.randn(num_slots, num_kv_heads, head_dim, generator=generator).to(dtype),
        value_mirror=torch.randn(num_slots, num_kv_heads, head_dim,
                                 generator=generator).to(dtype),
        context_slots=context_slots,
        context_lens=torch.tensor(context_lens),
        query_start_loc=torch.tensor([0] + nodes_per_request).cumsum(0),
        path_slots=path_slots,
        path_lens=path_lens,
        cos_sin=rope_cache(max(context_lens) + max_depth, head_dim),
    )


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
    """Context at scattered true positions, path at the chain positions after
    it: the node's output equals the chain row's last query."""
    block_size, num_heads, num_kv_heads, head_dim = 16, 6, 2, 64
    generator = torch.Generator().manual_seed(1)
    prompt_len, depth = 200, 5
    context_positions = torch.cat((torch.arange(0, 32), torch.arange(96, 128),
                                   torch.arange(150, prompt_len)))
    path_positions = torch.arange(prompt_len, prompt_len + depth)
    block_table, num_blocks = random_block_table([prompt_len + depth], block_size)
    key_mirror = torch.randn(num_blocks * block_size, num_kv_heads, head_dim,
                             generator=generator)
    value_mirror = torch.randn_like(key_mirror)
    query = torch.randn(1, num_heads, head_dim, generator=generator)
    cos_sin = rope_cache(512, head_dim)

    tree_out, _ = draft_tree_attention_reference(
        query, key_mirror, value_mirror,
        slots_of(block_table[0], context_positions, block_size)[None],
        torch.tensor([len(context_positions)]), torch.tensor([0, 1]),
        slots_of(block_table[0], path_positions, block_size)[None], torch.tensor([depth]),
        cos_sin)
    chain_positions = torch.cat((context_positions, path_positions))
    chain_out, _ = working_set_attention_reference(
        query, key_mirror, value_mirror, block_table, torch.tensor([0, 1]),
        chain_positions[None], torch.tensor([len(chain_positions)]), cos_sin, block_size)
    torch.testing.assert_close(tree_out, chain_out, atol=1e-5, rtol=1e-5)
    # A node does not see another branch: a different path changes it.
    other_branch = slots_of(block_table[0], path_positions.flip(0), block_size)[None]
    other_out, _ = draft_tree_attention_reference(
        query, key_mirror, value_mirror,
        slots_of(block_table[0], context_positions, block_size)[None],
        torch.tensor([len(context_positions)]), torch.tensor([0, 1]), other_branch,
        torch.tensor([depth]), cos_sin)
    assert not torch.allclose(other_out, tree_out, atol=1e-3)
