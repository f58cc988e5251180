"""The working cache's layout on its own: the window from a chunk boundary,
top-k selection among the chunks before it, compact positions, and RoPE
moves between positions (checked against rotating from scratch)."""

import pytest
import torch

from vllm_specextend.attention.rope import rotate_by
from vllm_specextend.retrieval.working_cache import (
    select_chunks,
    streaming_scores,
    window_starts,
    working_cache_layout,
)


def rope_cache(max_positions, head_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_positions).float(), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def rotate_at(x, positions, cos_sin):
    """NeoX RoPE from scratch: x [n, heads, dim] rotated for positions [n]."""
    half = x.shape[-1] // 2
    cos, sin = cos_sin[positions, :half][:, None], cos_sin[positions, half:][:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def test_window_starts_at_a_chunk_boundary():
    assert window_starts(torch.tensor([40, 13, 6, 100]), 4, 8).tolist() == [32, 4, 0, 92]


def test_selection_keeps_top_chunks_before_the_window_in_order():
    chunk, context = 4, torch.tensor([40, 13, 6])
    scores = torch.full((3, 10), float("-inf"))
    scores[0] = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.3, 0.0, 0.7, 0.5, 0.6, 0.4])
    scores[1, :4] = torch.tensor([0.1, 0.9, 0.2, 0.3])
    scores[2, :2] = torch.tensor([0.5, 0.6])
    start = window_starts(context, chunk, recent_tokens=8)  # [32, 4, 0]
    kept, num_kept = select_chunks(scores, start, chunk, top_k=2)
    # Request 0: chunks 0..7 compete, the best are 0 and 2 (ascending).
    # Request 1: only chunk 0 starts before the window at 4. Request 2: none.
    assert num_kept.tolist() == [2, 1, 0]
    assert kept[0].tolist() == [0, 2] and kept[1, 0] == 0


def test_layout_puts_kept_chunks_then_the_window_at_compact_positions():
    chunk = 4
    kept = torch.tensor([[2, 0, 99], [1, 99, 99]])  # ascending, then unused columns
    num_kept = torch.tensor([2, 1])
    context = torch.tensor([40, 13])
    start = torch.tensor([32, 8])
    layout = working_cache_layout(kept, num_kept, start, context, chunk, capacity=20)
    expected0 = [8, 9, 10, 11, 0, 1, 2, 3] + list(range(32, 40))
    assert layout.lengths.tolist() == [16, 9]
    assert layout.source_positions[0, :16].tolist() == expected0
    assert layout.source_positions[1, :9].tolist() == [4, 5, 6, 7] + list(range(8, 13))
    # From the window on, true = compact + offset, also for later tokens.
    assert layout.offsets.tolist() == [32 - 8, 8 - 4]
    assert (layout.source_positions[:, 16:] == 0).all()


def test_streaming_scores_keep_first_chunk_and_newest():
    context = torch.tensor([300, 40])
    start = window_starts(context, 32, 64)  # [224, 0]
    kept, num_kept = select_chunks(streaming_scores(10, 2), start, 32, top_k=3)
    assert num_kept.tolist() == [3, 0]
    assert kept[0].tolist() == [0, 5, 6]  # the sink, then the newest before the window


def test_rotate_by_moves_a_rotated_key_to_another_position():
    torch.manual_seed(0)
    head_dim = 32
    cos_sin = rope_cache(4096, head_dim)
    keys = torch.randn(6, 2, head_dim)
    true = torch.tensor([3000, 17, 0, 2047, 5, 1000])
    compact = torch.tensor([0, 17, 3, 100, 5, 4000])
    moved = rotate_by(rotate_at(keys, true, cos_sin), compact - true, cos_sin)
    # float32 angles t x freq carry about t x 6e-8 radians of rounding (2.4e-4
    # at t = 4,000) in each table, hence atol 1e-3 on values of magnitude ~3.
    torch.testing.assert_close(moved, rotate_at(keys, compact, cos_sin), atol=1e-3, rtol=0)
    # Moving by 0 changes nothing.
    torch.testing.assert_close(rotate_by(keys, torch.zeros(6, dtype=torch.long), cos_sin), keys)


def test_vllms_fused_kernel_moves_back_as_the_reference():
    """The glue moves queries and keys back with vLLM's RoPE kernel and the
    backward table; it agrees with `rotate_by` in place, keys and queries
    together, on strided views like the ones vLLM's attention receives."""
    from vllm_specextend.attention.rope import backward_table
    from vllm_specextend.vllm_glue.rotation import move_back_

    torch.manual_seed(1)
    head_dim, tokens = 64, 5
    cos_sin = rope_cache(4096, head_dim)
    qkv = torch.randn(tokens, (4 + 2 + 2) * head_dim)
    query = qkv[:, : 4 * head_dim].view(tokens, 4, head_dim)
    key = qkv[:, 4 * head_dim: 6 * head_dim].view(tokens, 2, head_dim)
    amount = torch.tensor([0, 1, 17, 2000, 4095])
    expected_query = rotate_by(query, -amount, cos_sin)
    expected_key = rotate_by(key, -amount, cos_sin)
    move_back_(amount, backward_table(cos_sin), query, key)
    torch.testing.assert_close(query, expected_query, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(key, expected_key, atol=1e-5, rtol=1e-5)


def test_a_working_cache_view_takes_the_dimension_order_of_vllms_cache():
    """vLLM's cache may be a permuted view ([blocks, block_size, heads, dim]
    over [blocks, heads, block_size, dim] storage): the working cache's view
    orders its strides alike and covers its storage exactly once."""
    from vllm_specextend.paged_cache import dense_view_like

    like = torch.zeros(5, 2, 16, 8).permute(0, 2, 1, 3)
    storage = torch.zeros(3 * 16 * 2 * 8)
    view = dense_view_like(storage, like, num_blocks=3)
    assert view.shape == (3, 16, 2, 8)
    assert view.stride() == (16 * 2 * 8, 8, 16 * 8, 1)
    view.copy_(torch.arange(storage.numel(), dtype=torch.float32).view(3, 2, 16, 8)
               .permute(0, 2, 1, 3))
    assert storage.tolist() == list(range(storage.numel()))
    with pytest.raises(ValueError, match="cannot hold"):
        dense_view_like(torch.zeros(100), like, num_blocks=3)
