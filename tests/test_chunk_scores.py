"""Chunk-score kernel and the batched dense path (vLLM's CPU build) vs the
softmax reference (TRITON_INTERPRET=1 on CPU), and top-k finds the chunk
where a needle is planted."""

import pytest
import torch

from kernel_inputs import random_block_table
from vllm_specextend.retrieval.chunk_scores import (
    chunk_scores,
    chunk_scores_dense,
    chunk_scores_reference,
)


def dense_scores(query, keys_per_row, chunk_size):
    """Scores straight from the definition, one request at a time."""
    rows = []
    for q, keys in zip(query, keys_per_row):
        group = q.shape[0] // keys.shape[1]
        k = keys.repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,thd->ht", q, k) / q.shape[-1] ** 0.5).softmax(-1).mean(0)
        rows.append(torch.stack([c.mean() for c in probs.split(chunk_size)]))
    return rows


def make_inputs(context_lens, num_heads, num_kv_heads, head_dim, block_size, seed=0):
    torch.manual_seed(seed)
    table, num_blocks = random_block_table(context_lens, block_size, seed=seed)
    # vLLM's per-layer view is [blocks, heads, block_size, key | value]: keys
    # as [blocks, block_size, heads, dim] are strided, as the kernel reads them.
    kv_cache = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_dim)
    key_cache = kv_cache.transpose(1, 2)[..., :head_dim]
    query = torch.randn(len(context_lens), num_heads, head_dim)
    return query, key_cache, table, torch.tensor(context_lens, dtype=torch.int32)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim,block_size,chunk_size", [(32, 16, 32), (64, 32, 64), (80, 16, 48)])
def test_kernel_matches_reference(num_heads, num_kv_heads, head_dim, block_size, chunk_size):
    # Lengths with a partial last chunk, a single token, and exact multiples.
    context_lens = [1, chunk_size, 3 * chunk_size + 5, 301]
    query, key_cache, table, lens = make_inputs(context_lens, num_heads, num_kv_heads,
                                                head_dim, block_size)
    expected = chunk_scores_reference(query, key_cache, table, lens, block_size, chunk_size)
    got = chunk_scores(query, key_cache, table, lens, block_size, chunk_size,
                       max_len=max(context_lens))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # Split-KV LSE pass: several splits per context, empty ones for short rows.
    split = chunk_scores(query, key_cache, table, lens, block_size, chunk_size,
                         max_len=max(context_lens), split_len=64)
    torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-7)
    # The reference itself against the definition (gathered keys, dense softmax).
    def keys_of(row, n):
        positions = torch.arange(n)
        return key_cache[table[row, positions // block_size].long(), positions % block_size]

    keys = [keys_of(r, n) for r, n in enumerate(context_lens)]
    for row, scores in enumerate(dense_scores(query, keys, chunk_size)):
        torch.testing.assert_close(expected[row, : len(scores)], scores, rtol=1e-5, atol=1e-7)
        assert torch.isinf(expected[row, len(scores):]).all()
    # The batched path over the gathered keys (what vLLM's CPU build scores).
    max_len = max(context_lens)
    gathered = torch.stack([keys_of(r, max_len) for r in range(len(context_lens))])
    dense = chunk_scores_dense(query, gathered, lens, chunk_size)
    torch.testing.assert_close(dense, expected[:, : dense.shape[1]], rtol=1e-5, atol=1e-7)


def test_top_chunk_is_the_needle():
    num_heads, num_kv_heads, head_dim, block_size, chunk_size = 8, 2, 32, 16, 32
    context_lens = [700, 1000, 333]
    query, key_cache, table, lens = make_inputs(context_lens, num_heads, num_kv_heads,
                                                head_dim, block_size, seed=1)
    needles = [5, 17, 2]  # chunk index per request
    for row, chunk in enumerate(needles):
        position = chunk * chunk_size + 7
        block = int(table[row, position // block_size])
        # A key aligned with every query head of its group: the attention peak.
        group = num_heads // num_kv_heads
        for kv_head in range(num_kv_heads):
            direction = query[row, kv_head * group : (kv_head + 1) * group].sum(0)
            key_cache[block, position % block_size, kv_head] = (
                4.0 * head_dim**0.5 * direction / direction.norm())
    scores = chunk_scores(query, key_cache, table, lens, block_size, chunk_size, max_len=1000)
    assert scores.argmax(dim=1).tolist() == needles


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_in_half_precision(dtype):
    """Half-precision queries and keys (the model's dtype on GPU) against the
    reference on the same rounded inputs; scores are float32 either way."""
    query, key_cache, table, lens = make_inputs([700, 1000, 333], 8, 2, 64, 16)
    query, key_cache = query.to(dtype), key_cache.to(dtype)
    expected = chunk_scores_reference(query, key_cache, table, lens, 16, 32)
    got = chunk_scores(query, key_cache, table, lens, 16, 32, max_len=1000, split_len=256)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-5)
