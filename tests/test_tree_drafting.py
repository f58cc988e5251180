"""What a tree's nodes attend to besides their path, without an engine: a
root without a working cache sees the last `main_window` positions of
vLLM's cache up to itself; a root with one sees its working cache up to its
compact position."""

from types import SimpleNamespace

import numpy as np
import torch

from vllm_specextend.vllm_glue.trees.drafting import TreeContext


class PlainReader:
    def read(self, cache, slots):
        return cache[slots], cache[slots] + 1000


def test_roots_see_their_window_or_their_working_cache():
    block_size, main_window, capacity = 4, 6, 8
    block_table = torch.tensor([[3, 1, 2, 0], [5, 6, 7, 4]], dtype=torch.int32)
    main_cache = torch.arange(32.0)[:, None, None]  # slot s holds key s
    working_cache = 100 + torch.arange(16.0)[:, None, None]  # two caches of 8 slots
    caches = SimpleNamespace(geometry=SimpleNamespace(capacity=capacity),
                             cache_of=lambda name, like: working_cache)
    # Row 1 holds working cache 1 (slots 8..15); its window starts 10 past its compact positions.
    round_ = SimpleNamespace(caches=caches, uses_working_caches=True,
                             compact_rows_device=torch.tensor([1]),
                             main_rows_device=torch.tensor([0]),
                             compact_offsets=torch.tensor([10]),
                             compact_bases=torch.tensor([8]), compact_rows=np.array([1]))
    layers = {"draft.0": SimpleNamespace(kv_cache=main_cache)}
    roots = torch.tensor([9, 13])
    context = TreeContext(layers, PlainReader(), round_, block_table, roots, main_window,
                          block_size)
    keys, values = context.read("draft.0")
    assert context.lens.tolist() == [6, 4]  # positions 4..9; compact 0..3
    expected_slots = [int(block_table[0, p // 4]) * 4 + p % 4 for p in range(4, 10)]
    assert keys[0, :6, 0, 0].tolist() == expected_slots
    assert keys[1, :4, 0, 0].tolist() == [108.0, 109.0, 110.0, 111.0]
    assert torch.equal(values, keys + 1000)
    assert context.row_offsets.tolist() == [0, 10]


def test_without_working_caches_every_root_sees_its_window():
    block_table = torch.arange(8, dtype=torch.int32).view(2, 4)
    main_cache = torch.arange(32.0)[:, None, None]
    layers = {"draft.0": SimpleNamespace(kv_cache=main_cache)}
    context = TreeContext(layers, PlainReader(), None, block_table, torch.tensor([2, 15]), 6, 4)
    keys, _ = context.read("draft.0")
    assert context.lens.tolist() == [3, 6]
    assert keys[0, :3, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert keys[1, :6, 0, 0].tolist() == [16.0 + p for p in range(10, 16)]
