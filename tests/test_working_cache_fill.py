"""A refresh's fill (`WorkingCaches.fill`) without an engine: vLLM's CPU
cache write and fused RoPE kernel on plain tensors, two requests with
scattered blocks filling each other's-numbered working caches. From keys
rotated at their true positions in vLLM's packed cache, each working cache
holds its request's kept chunks and recent window (written out here from
the chunk indices) as keys rotated at compact positions 0..n-1, values
unchanged."""

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

from vllm_specextend.attention.rope import backward_table, rotate_by
from vllm_specextend.config import WorkingCacheGeometry
from vllm_specextend.retrieval.working_cache import window_starts, working_cache_layout
from vllm_specextend.retrieval.working_caches import WorkingCaches
from vllm_specextend.vllm_glue.kv_cache_reader import PackedCPUKVReader
from vllm_specextend.vllm_glue.rotation import move_back_

NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 2, 32, 32, 16
GEOMETRY = WorkingCacheGeometry(draft_window=128, chunk_size=16, top_k_chunks=3,
                                recent_tokens=24, tokens_between_refreshes=4,
                                positions_past_window=4, retrieval_min_len=64,
                                whole_context_max_len=64, main_window=64)
CONTEXT_LENS = (200, 150)
BLOCKS = ([3, 7, 1, 9, 12, 2, 5], [0, 4, 6, 8, 10])
KEPT_CHUNKS = ([0, 4, 9], [1, 3, 6])
FILLED_CACHES = (1, 0)


def rope_table(num_positions: int) -> torch.Tensor:
    """NeoX cos/sin rows, vLLM's layout (cosines, then sines)."""
    inverse_frequency = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    angles = torch.outer(torch.arange(num_positions).float(), inverse_frequency)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


@pytest.fixture(scope="module")
def filled():
    dtype = torch.float32
    isa = _get_attn_isa(dtype, BLOCK_SIZE, HEAD_DIM, "auto")
    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    layer = SimpleNamespace(
        isa=isa, _k_scale_float=1.0, _v_scale_float=1.0, impl=impl, num_kv_heads=NUM_KV_HEADS,
        head_size=HEAD_DIM, head_size_v=HEAD_DIM,
        kv_cache=torch.zeros(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, dtype=dtype))
    cos_sin = rope_table(max(CONTEXT_LENS))
    generator = torch.Generator().manual_seed(0)
    block_table = torch.zeros(len(BLOCKS), max(map(len, BLOCKS)), dtype=torch.int32)
    unrotated, values = [], []
    for row, (length, blocks) in enumerate(zip(CONTEXT_LENS, BLOCKS)):
        block_table[row, : len(blocks)] = torch.tensor(blocks)
        keys = torch.randn(length, NUM_KV_HEADS, HEAD_DIM, generator=generator)
        row_values = torch.randn(length, NUM_KV_HEADS, HEAD_DIM, generator=generator)
        positions = torch.arange(length)
        slots = (torch.tensor(blocks)[positions // BLOCK_SIZE] * BLOCK_SIZE
                 + positions % BLOCK_SIZE)
        impl.do_kv_cache_update(layer, rotate_by(keys, positions, cos_sin), row_values,
                                layer.kv_cache, slots)
        unrotated.append(keys)
        values.append(row_values)

    caches = WorkingCaches({"layer": layer}, GEOMETRY, num_caches=2, block_size=BLOCK_SIZE,
                           dtype=dtype, device=torch.device("cpu"), move_back=move_back_)
    context = torch.tensor(CONTEXT_LENS)
    window_start = window_starts(context, GEOMETRY.chunk_size, GEOMETRY.recent_tokens)
    kept = torch.tensor(KEPT_CHUNKS)
    layout = working_cache_layout(kept, torch.full((len(KEPT_CHUNKS),), kept.shape[1]),
                                  window_start, context, GEOMETRY.chunk_size, GEOMETRY.capacity)
    reader = PackedCPUKVReader(isa, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, dtype)
    caches.fill({"layer": layer}, reader, block_table, torch.tensor(FILLED_CACHES), layout,
                backward_table(cos_sin))
    return caches, layer, reader, layout, unrotated, values, cos_sin


def selected_positions(row: int) -> list[int]:
    chunk, length = GEOMETRY.chunk_size, CONTEXT_LENS[row]
    window_start = (length - GEOMETRY.recent_tokens) // chunk * chunk
    return [c * chunk + i for c in KEPT_CHUNKS[row] for i in range(chunk)] + list(
        range(window_start, length))


@pytest.mark.parametrize("row", [0, 1])
def test_working_cache_holds_the_selected_tokens_at_compact_positions(filled, row):
    caches, layer, reader, layout, unrotated, values, cos_sin = filled
    selected = torch.tensor(selected_positions(row))
    count = len(selected)
    assert int(layout.lengths[row]) == count
    slots = FILLED_CACHES[row] * caches.blocks_per_cache * BLOCK_SIZE + torch.arange(count)
    keys, read_values = reader.read(caches.cache_of("layer", layer.kv_cache), slots)
    expected_keys = rotate_by(unrotated[row][selected], torch.arange(count), cos_sin)
    torch.testing.assert_close(keys, expected_keys, atol=1e-5, rtol=1e-5)
    assert torch.equal(read_values, values[row][selected])


def test_each_cache_keeps_its_requests_offset(filled):
    caches, _, _, layout, _, _, _ = filled
    assert torch.equal(caches.offsets[list(FILLED_CACHES)], layout.offsets)
    # From the window on, true minus compact position.
    for row, cache in enumerate(FILLED_CACHES):
        retrieved = len(KEPT_CHUNKS[row]) * GEOMETRY.chunk_size
        assert int(caches.offsets[cache]) == selected_positions(row)[retrieved] - retrieved
