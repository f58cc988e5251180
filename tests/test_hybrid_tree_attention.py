"""Hybrid Tree Attention (Triton, and the CPU path) vs the dense masked reference, under
TRITON_INTERPRET=1 on CPU: random trees of several shapes, prefix lengths
0, 1, 15, 16, 17 and 1000, block sizes 16 and 32, GQA 1/4/8, mixed batches,
fp32/fp16/bf16; and the LSE merge against one softmax over the union."""

import random

import pytest
import torch

from kernel_inputs import random_block_table
from vllm_specextend.attention.hybrid_tree_attention import (
    ancestor_bitmasks,
    hybrid_tree_attention,
    hybrid_tree_attention_cpu,
    merge_attention_states,
    tree_attention_reference,
)
from vllm_specextend.limits import MAX_TREE_TOKENS

PREFIX_LENS = [0, 1, 15, 16, 17, 1000]
# Output tolerance per dtype: inputs are rounded to the dtype, math is fp32.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def tree_parents(shape: str, nodes: int, rng: random.Random) -> list[int]:
    if shape == "star":
        return [-1] + [0] * (nodes - 1)
    if shape == "path":
        return list(range(-1, nodes - 1))
    if shape == "balanced":
        return [-1] + [(i - 1) // 2 for i in range(1, nodes)]
    # OPT-Tree-like: each new node hangs under one of the few newest ones.
    return [-1] + [rng.randrange(max(0, i - 4), i) for i in range(1, nodes)]


def make_batch(trees, prefix_lens, num_heads, num_kv_heads, block_size, dtype, seed=0):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    parents, sizes = [], []
    for shape, nodes in trees:
        parents += tree_parents(shape, nodes, rng)
        sizes.append(nodes)
    tree_start_loc = torch.tensor([0] + sizes).cumsum(0).to(torch.int32)
    masks = ancestor_bitmasks(torch.tensor(parents), tree_start_loc)
    lengths = [p + n for p, n in zip(prefix_lens, sizes)]
    table, num_blocks = random_block_table(lengths, block_size, seed=seed)
    head_dim = 32
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn(sum(sizes), num_heads, head_dim, generator=gen).to(dtype)
    return (query, key_cache, value_cache, table,
            torch.tensor(prefix_lens, dtype=torch.int32), tree_start_loc, masks)


def check(batch, block_size, dtype):
    """The Triton HTA and the CPU path (with splits small enough that a
    1000-token prefix takes several) both equal the dense reference."""
    query, key_cache, value_cache, table, prefix_lens, tree_start_loc, masks = batch
    expected = tree_attention_reference(query, key_cache, value_cache, table, prefix_lens,
                                        tree_start_loc, masks, block_size)
    triton_out = hybrid_tree_attention(query, key_cache, value_cache, table, prefix_lens,
                                       tree_start_loc, masks, block_size,
                                       max_prefix_len=int(prefix_lens.max()))
    cpu_out = hybrid_tree_attention_cpu(query, lambda slots: (key_cache[slots], value_cache[slots]),
                                        table, prefix_lens, tree_start_loc, masks, block_size,
                                        split_len=300)
    tolerance = TOLERANCE[dtype]
    for got in (triton_out, cpu_out):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_mixed_batch_every_shape_and_prefix(block_size, num_heads, num_kv_heads):
    shapes = ["star", "path", "balanced", "opt_tree"]
    trees = [(shapes[i % 4], [1, 5, 16, 9, 12, 16][i]) for i in range(len(PREFIX_LENS))]
    batch = make_batch(trees, PREFIX_LENS, num_heads, num_kv_heads, block_size, torch.float32)
    check(batch, block_size, torch.float32)


@pytest.mark.parametrize("shape", ["star", "path", "balanced", "opt_tree"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(shape, dtype):
    trees = [(shape, 16), (shape, 7)]
    batch = make_batch(trees, [17, 1000], 8, 2, 16, dtype, seed=1)
    check(batch, 16, dtype)


def test_largest_tree_uses_all_64_mask_bits():
    batch = make_batch([("opt_tree", MAX_TREE_TOKENS), ("path", MAX_TREE_TOKENS)], [15, 0],
                       4, 1, 16, torch.float32, seed=2)
    masks = batch[-1]
    assert int(masks[MAX_TREE_TOKENS - 1]) < 0  # bit 63 set on the last path node
    check(batch, 16, torch.float32)


def test_ancestor_bitmasks():
    masks = ancestor_bitmasks(torch.tensor([-1, 0, 0, 1, -1, 0]), torch.tensor([0, 4, 6]))
    assert masks.tolist() == [0b1, 0b11, 0b101, 0b1011, 0b1, 0b11]
    with pytest.raises(ValueError, match="at most 64"):
        ancestor_bitmasks(torch.tensor([-1] + [0] * 64), torch.tensor([0, 65]))


def test_merge_equals_single_softmax_over_union():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40, dtype=torch.float64) * 4
    values = torch.randn(40, 16, dtype=torch.float64)
    split = 23

    def part(lo, hi):
        lse = logits[..., lo:hi].logsumexp(-1)
        return logits[..., lo:hi].softmax(-1) @ values[lo:hi], lse

    merged, lse = merge_attention_states(*part(0, split), *part(split, 40))
    torch.testing.assert_close(merged.double(), logits.softmax(-1) @ values, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1))
    # An empty part (lse -inf) contributes nothing.
    out, empty_lse = torch.zeros(3, 5, 16), torch.full((3, 5), float("-inf"))
    merged, _ = merge_attention_states(out, empty_lse, *part(0, 40))
    torch.testing.assert_close(merged.double(), logits.softmax(-1) @ values, atol=1e-6, rtol=1e-6)
