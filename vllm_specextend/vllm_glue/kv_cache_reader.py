"""Reading keys and values back from vLLM's own KV cache, so the plugin keeps
no copy of it.

vLLM 0.32 views every layer's cache as [num_blocks, num_kv_heads,
block_size, head_dim + head_dim_v] (its strides follow the configured
layout). GPU backends (FlashAttention, Triton) keep each token's key and
value plain in that view: read in place. vLLM's CPU backend reinterprets a
block as [num_kv_heads, 2 * block_size, head_dim] (keys in the first
block_size rows of each head, values after) and packs each head's keys, and
values in bf16, in an ISA-specific order. That order is a permutation
inside each (block, head), so it is learned once, by writing known values
through vLLM's own cache write, and every read is then one gather. Writes
always go through vLLM's own `do_kv_cache_update`.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

# Values written by the probe are exact in bf16 below 2^8: ids go digit by digit.
_PROBE_BASE = 128
_PROBE_DIGITS = 3


class PlainKVReader:
    """Caches that keep each token's key and value plain (GPU backends)."""

    def __init__(self, block_size: int, head_dim: int):
        self.block_size = block_size
        self.head_dim = head_dim

    def read(self, kv_cache: torch.Tensor, slots: torch.Tensor):
        """Keys and values [n, num_kv_heads, head_dim] at `slots` [n] (>= 0)."""
        tokens = kv_cache[slots // self.block_size, :, slots % self.block_size]
        return tokens[..., : self.head_dim], tokens[..., self.head_dim:]

    def read_keys(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Keys only [n, num_kv_heads, head_dim] at `slots` [n] (>= 0)."""
        return kv_cache[slots // self.block_size, :, slots % self.block_size, : self.head_dim]


class PackedCPUKVReader:
    """vLLM's CPU cache, whatever the ISA's packing inside a block: each
    element's offset inside its block is learned once, so a read is one
    gather with one flat index (four index tensors cost 30x more)."""

    def __init__(self, isa: str, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype):
        self.block_size = block_size
        self.key_index, self.value_index = _probe_cpu_packing(
            isa, num_kv_heads, head_dim, block_size, dtype)
        self._offsets: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def read(self, kv_cache: torch.Tensor, slots: torch.Tensor):
        elements, offsets = self._flat(kv_cache)
        block_starts, inside = self._split(kv_cache, slots)
        return tuple(_gather(elements, block_starts, part[inside]) for part in offsets)

    def read_keys(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        elements, (key_offsets, _) = self._flat(kv_cache)
        block_starts, inside = self._split(kv_cache, slots)
        return _gather(elements, block_starts, key_offsets[inside])

    def _split(self, kv_cache: torch.Tensor, slots: torch.Tensor):
        """Each slot's block's first element, and its token inside the block."""
        return (slots // self.block_size) * kv_cache.stride(0), slots % self.block_size

    def _flat(self, kv_cache: torch.Tensor):
        """The cache's elements in one dimension from its first, and each
        (token in block, head, dim)'s offset from its block's first element
        for keys and values, for the cache's strides."""
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        view = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1)
        strides = view.stride()
        offsets = self._offsets.get(strides)
        if offsets is None:
            offsets = self._offsets[strides] = tuple(
                (heads * strides[1] + rows * strides[2] + columns * strides[3]).to(
                    kv_cache.device)
                for heads, rows, columns in (self.key_index, self.value_index))
        span = (num_blocks - 1) * strides[0] + sum(
            (size - 1) * stride for size, stride in zip(view.shape[1:], strides[1:])) + 1
        return view.as_strided((span,), (1,)), offsets


def _gather(elements: torch.Tensor, block_starts: torch.Tensor,
            offsets: torch.Tensor) -> torch.Tensor:
    """elements[block_starts[n] + offsets[n, head, dim]], one index_select."""
    index = block_starts[:, None, None] + offsets
    return elements.index_select(0, index.flatten()).view(index.shape)


def _probe_cpu_packing(isa, num_kv_heads, head_dim, block_size, dtype):
    """Write ids through vLLM's cache write into one block; return, for keys
    and values, where element (token, head, dim) landed: (head, row, column)
    index tensors of shape [block_size, num_kv_heads, head_dim]."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    ids = torch.arange(block_size * num_kv_heads * head_dim).view(
        block_size, num_kv_heads, head_dim)
    cache = torch.zeros(1, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    landed = torch.zeros(cache.numel(), dtype=torch.long)
    weight = 1
    for _ in range(_PROBE_DIGITS):
        digit = ((ids // weight) % _PROBE_BASE).to(dtype)
        impl.do_kv_cache_update(layer, digit, digit, cache, torch.arange(block_size))
        landed += cache.flatten().long() * weight
        weight *= _PROBE_BASE
    view_shape = (num_kv_heads, 2 * block_size, head_dim)
    where = torch.empty(2, ids.numel(), 3, dtype=torch.long)
    for half in range(2):  # keys: rows [0, block_size); values: after
        rows = slice(half * block_size, (half + 1) * block_size)
        landed_here = landed.view(view_shape)[:, rows].flatten()
        if not torch.equal(landed_here.sort().values, ids.flatten()):
            raise RuntimeError(f"vLLM's CPU KV cache layout (isa {isa}) is not a "
                               f"permutation inside each block; SpecExtend cannot read it")
        element = torch.arange(cache.numel()).view(view_shape)[:, rows].flatten()
        where[half, landed_here] = torch.stack(torch.unravel_index(element, view_shape), 1)
    key, value = (where[half].view(block_size, num_kv_heads, head_dim, 3).unbind(-1)
                  for half in range(2))
    return key, value


@functools.cache
def _packed_reader(isa, num_kv_heads, head_dim, block_size, dtype):
    return PackedCPUKVReader(isa, num_kv_heads, head_dim, block_size, dtype)


def reader_for(layer, block_size: int, dtype: torch.dtype, kv_cache_dtype: str):
    """The reader of one attention layer's cache (shared by layers of one
    shape: a CPU probe runs once per shape and process)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return PlainKVReader(block_size, layer.head_size)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, layer.head_size, kv_cache_dtype)
    return _packed_reader(isa, layer.num_kv_heads, layer.head_size, block_size, dtype)
