"""Working-set selection and the draft's compact-position attention
(kernel under TRITON_INTERPRET=1 vs the PyTorch reference vs SDPA over the
concatenated selected tokens)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernel_inputs import random_block_table  # noqa: E402
from vllm_specextend.attention.working_set_attention import (  # noqa: E402
    rotate,
    working_set_attention,
    working_set_attention_cpu,
    working_set_attention_reference,
)
from vllm_specextend.retrieval.working_set import (  # noqa: E402
    select_working_sets,
    streaming_scores,
    working_set_positions,
)


def rope_cache(max_positions, head_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_positions).float(), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def test_selection_keeps_top_chunks_window_and_order():
    chunk, context = 4, torch.tensor([40, 13, 6])
    scores = torch.full((3, 10), float("-inf"))
    scores[0, :10] = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.0, 0.7, 0.5, 0.6, 0.4])
    scores[1, :4] = torch.tensor([0.1, 0.9, 0.2, 0.3])
    scores[2, :2] = torch.tensor([0.5, 0.6])
    sets = select_working_sets(scores, context, chunk, top_k_chunks=2, recent_tokens=8)
    # Request 0: window 32.., chunks 0..7 compete: best are 0 and 2.
    assert sets.window_start.tolist() == [32, 5, 0]
    assert sets.kept_chunks[0].nonzero().flatten().tolist() == [0, 2]
    # Request 1: window 5..; chunks 0 and 1 start before it; both kept (k=2).
    assert sets.kept_chunks[1].nonzero().flatten().tolist() == [0, 1]
    # Request 2: all inside the window: nothing retrieved.
    assert not sets.kept_chunks[2].any()
    # Two tokens decoded since the refresh: they join the window.
    positions, num_keys = working_set_positions(sets, context + 2, max_len=42, max_keys=24)
    expected0 = [0, 1, 2, 3, 8, 9, 10, 11] + list(range(32, 42))
    assert num_keys.tolist() == [len(expected0), 15, 8]
    assert positions[0, : len(expected0)].tolist() == expected0
    assert positions[1, :15].tolist() == list(range(15))
    assert positions[2, :8].tolist() == list(range(8))


def test_streaming_scores_keep_first_chunk_and_newest():
    context = torch.tensor([300, 40])
    sets = select_working_sets(streaming_scores(10, 2), context, 32, top_k_chunks=3,
                               recent_tokens=64)
    # Window 236..: chunk 0 (the sink) and the two newest starting before it.
    assert sets.kept_chunks[0].nonzero().flatten().tolist() == [0, 6, 7]
    # Window 0..: everything is recent; nothing retrieved.
    assert not sets.kept_chunks[1].any()


def make_rows(num_keys, query_lens, num_heads, num_kv_heads, head_dim, block_size, seed):
    """Rows whose key positions are random sorted subsets of a longer context,
    ending with the query tokens' own positions."""
    gen = torch.Generator().manual_seed(seed)
    contexts = [n * 3 + 7 for n in num_keys]
    table, num_blocks = random_block_table(contexts, block_size, seed=seed)
    max_keys = max(num_keys)
    key_positions = torch.zeros(len(num_keys), max_keys, dtype=torch.long)
    for row, (n, q, context) in enumerate(zip(num_keys, query_lens, contexts)):
        older = torch.randperm(context - q, generator=gen)[: n - q].sort().values
        key_positions[row, :n] = torch.cat((older, torch.arange(context - q, context)))
    query_start_loc = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    slots = num_blocks * block_size
    key_cache = torch.randn(slots, num_kv_heads, head_dim, generator=gen)
    value_cache = torch.randn(slots, num_kv_heads, head_dim, generator=gen)
    query = torch.randn(int(query_start_loc[-1]), num_heads, head_dim, generator=gen)
    return (query, key_cache, value_cache, table, query_start_loc, key_positions,
            torch.tensor(num_keys, dtype=torch.int32))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_kernel_matches_reference_and_sdpa(num_heads, num_kv_heads, block_size):
    head_dim = 32
    num_keys, query_lens = [1, 37, 70, 5], [1, 5, 1, 5]
    inputs = make_rows(num_keys, query_lens, num_heads, num_kv_heads, head_dim, block_size, 0)
    query, key_cache, value_cache, table, qsl, key_positions, nkeys = inputs
    cos_sin = rope_cache(128, head_dim)
    out_ref, lse_ref = working_set_attention_reference(
        query, key_cache, value_cache, table, qsl, key_positions, nkeys, cos_sin, block_size)
    out, lse = working_set_attention(
        query, key_cache, value_cache, table, qsl, key_positions, nkeys, cos_sin, block_size)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-4, atol=1e-5)
    # Independent check: gather the selected tokens, RoPE at 0..n-1, SDPA.
    for row, (n, q_len) in enumerate(zip(num_keys, query_lens)):
        positions = key_positions[row, :n]
        slots = table[row, positions // block_size].long() * block_size + positions % block_size
        compact = torch.arange(n)
        k = rotate(key_cache[slots], compact, cos_sin)
        v = value_cache[slots]
        q = rotate(query[qsl[row]:qsl[row + 1]], compact[n - q_len:], cos_sin)
        mask = compact[None, :] <= compact[n - q_len:, None]
        expected = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
            enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out_ref[qsl[row]:qsl[row + 1]], expected,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (14, 2)])
def test_cpu_path_matches_reference(num_heads, num_kv_heads):
    """Decode rows (grouped matmuls), a long prefill piece (SDPA) and a row
    without queries, in one call."""
    head_dim, block_size = 32, 16
    num_keys, query_lens = [1, 37, 150, 5, 9], [1, 5, 90, 0, 9]
    inputs = make_rows(num_keys, query_lens, num_heads, num_kv_heads, head_dim, block_size, 1)
    cos_sin = rope_cache(256, head_dim)
    out_ref, _ = working_set_attention_reference(*inputs, cos_sin, block_size, scale=0.3)
    out = working_set_attention_cpu(*inputs, cos_sin, block_size, scale=0.3)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)


def test_full_context_working_set_equals_true_positions():
    """A short request's working set is its whole context: compact positions
    are then its true positions, so attention is the plain causal one."""
    head_dim, block_size, n = 32, 16, 50
    table, num_blocks = random_block_table([n], block_size)
    gen = torch.Generator().manual_seed(3)
    key_cache = torch.randn(num_blocks * block_size, 2, head_dim, generator=gen)
    value_cache = torch.randn(num_blocks * block_size, 2, head_dim, generator=gen)
    query = torch.randn(n, 4, head_dim, generator=gen)
    cos_sin = rope_cache(64, head_dim)
    out, _ = working_set_attention(
        query, key_cache, value_cache, table, torch.tensor([0, n], dtype=torch.int32),
        torch.arange(n)[None], torch.tensor([n], dtype=torch.int32), cos_sin, block_size)
    slots = table[0, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
    k = rotate(key_cache[slots], torch.arange(n), cos_sin)
    q = rotate(query, torch.arange(n), cos_sin)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), value_cache[slots].transpose(0, 1),
        is_causal=True, enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
