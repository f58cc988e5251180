"""Reading K/V back from vLLM's own CPU cache: whatever the ISA packs
(fp32 'vec', bf16 'amx' where the CPU has it, 'vec16' for head sizes not a
multiple of 32), what vLLM's cache write stored at a slot reads back
exactly."""

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

from vllm_specextend.vllm_glue.kv_cache_reader import PackedCPUKVReader, PlainKVReader


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,block_size,num_kv_heads",
                         [(32, 32, 2), (64, 128, 2), (128, 32, 4), (80, 32, 2)])
def test_reads_back_what_vllm_wrote(dtype, head_dim, block_size, num_kv_heads):
    isa = _get_attn_isa(dtype, block_size, head_dim, "auto")
    reader = PackedCPUKVReader(isa, num_kv_heads, head_dim, block_size, dtype)
    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    num_blocks = 5
    cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    count = 3 * block_size
    keys = torch.randn(count, num_kv_heads, head_dim, generator=generator).to(dtype)
    values = torch.randn(count, num_kv_heads, head_dim, generator=generator).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:count]
    impl.do_kv_cache_update(layer, keys, values, cache, slots)
    read_keys, read_values = reader.read(cache, slots)
    assert torch.equal(read_keys, keys) and torch.equal(read_values, values)
    assert torch.equal(reader.read_keys(cache, slots), keys)


def test_plain_reader_reads_keys_as_read_does():
    generator = torch.Generator().manual_seed(0)
    head_dim, block_size = 16, 8
    cache = torch.randn(4, 2, block_size, 2 * head_dim, generator=generator)
    reader = PlainKVReader(block_size, head_dim)
    slots = torch.tensor([3, 17, 30, 8])
    keys, values = reader.read(cache, slots)
    assert torch.equal(reader.read_keys(cache, slots), keys)
    assert torch.equal(keys[1], cache[2, :, 1, :head_dim])
    assert torch.equal(values[1], cache[2, :, 1, head_dim:])
