"""Chunk-score kernel vs the dense softmax reference (TRITON_INTERPRET=1 on
CPU), and top-k finds the chunk where a needle is planted."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernel_inputs import random_block_table  # noqa: E402
from vllm_specextend.retrieval.chunk_scores import (  # noqa: E402
    chunk_scores,
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
    key_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim)
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
    # The reference itself against the definition (gathered keys, dense softmax).
    slots = lambda row, n: (table[row, torch.arange(n) // block_size].long() * block_size
                            + torch.arange(n) % block_size)
    keys = [key_cache[slots(r, n)] for r, n in enumerate(context_lens)]
    for row, scores in enumerate(dense_scores(query, keys, chunk_size)):
        torch.testing.assert_close(expected[row, : len(scores)], scores, rtol=1e-5, atol=1e-7)
        assert torch.isinf(expected[row, len(scores):]).all()


def test_top_chunk_is_the_needle():
    num_heads, num_kv_heads, head_dim, block_size, chunk_size = 8, 2, 32, 16, 32
    context_lens = [700, 1000, 333]
    query, key_cache, table, lens = make_inputs(context_lens, num_heads, num_kv_heads,
                                                head_dim, block_size, seed=1)
    needles = [5, 17, 2]  # chunk index per request
    for row, chunk in enumerate(needles):
        position = chunk * chunk_size + 7
        slot = int(table[row, position // block_size]) * block_size + position % block_size
        # A key aligned with every query head of its group: the attention peak.
        group = num_heads // num_kv_heads
        for kv_head in range(num_kv_heads):
            direction = query[row, kv_head * group : (kv_head + 1) * group].sum(0)
            key_cache[slot, kv_head] = 4.0 * head_dim**0.5 * direction / direction.norm()
    scores = chunk_scores(query, key_cache, table, lens, block_size, chunk_size, max_len=1000)
    assert scores.argmax(dim=1).tolist() == needles
