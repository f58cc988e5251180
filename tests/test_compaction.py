"""After tree acceptance, the accepted path's K/V end up where a chain of
the same tokens would have been written; other slots are untouched. In
vLLM's packed CPU cache this is checked through vLLM's own attention kernel
and by reading the cache back."""

import torch

from kernel_inputs import random_block_table
from vllm_specextend.tree.compaction import compaction_moves


def apply_moves(cache: torch.Tensor, source: torch.Tensor, destination: torch.Tensor) -> None:
    """A plain cache [num_slots, ...]: every source read before any write."""
    cache[destination] = cache[source]


def test_accepted_path_lands_at_chain_slots():
    block_size = 4
    prefix_lens = torch.tensor([5, 0, 9])
    nodes = 7
    table, num_blocks = random_block_table([p + nodes for p in prefix_lens.tolist()],
                                           block_size, seed=3)
    # Accepted local nodes: a deep path, nothing, the first nodes in order.
    accepted = torch.tensor([[1, 3, 6], [-1, -1, -1], [0, 1, -1]])
    num_accepted = torch.tensor([3, 0, 2])
    cache = torch.randn(num_blocks * block_size, 2, 3)
    before = cache.clone()

    def slot(row, position):
        return int(table[row, position // block_size]) * block_size + position % block_size

    source, destination = compaction_moves(accepted, num_accepted, prefix_lens, table, block_size)
    apply_moves(cache, source, destination)
    moved = set()
    for row in range(3):
        for step in range(int(num_accepted[row])):
            target = slot(row, int(prefix_lens[row]) + step)
            node_slot = slot(row, int(prefix_lens[row]) + int(accepted[row, step]))
            assert torch.equal(cache[target], before[node_slot])
            moved.add(target)
    assert len(source) == 3  # row 0 moves 1->0, 3->1, 6->2; row 2 is in place
    untouched = [s for s in range(cache.shape[0]) if s not in moved]
    assert torch.equal(cache[untouched], before[untouched])


def test_compaction_in_vllms_cpu_cache(tiny_pair):
    """Tree nodes written through vLLM's CPU cache write, the accepted path
    compacted: vLLM's own attention kernel then reads, for the next token,
    exactly what it reads from a cache that only ever held the chain."""
    from types import SimpleNamespace

    from vllm import _custom_ops as ops
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

    from vllm_specextend.vllm_glue.trees.backend import HybridTreeCPUAttentionImpl

    load_general_plugins()
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 64, 32
    config = EngineArgs(
        model=str(tiny_pair.target), dtype="float32", max_model_len=512, block_size=block_size,
        speculative_config={"method": "specextend", "model": str(tiny_pair.draft),
                            "num_speculative_tokens": 7, "hybrid_tree_attention": True},
    ).create_engine_config()
    with set_current_vllm_config(config):
        impl = HybridTreeCPUAttentionImpl(num_heads, head_dim, head_dim ** -0.5, num_kv_heads,
                                          None, None, "auto")
    # The attributes of vLLM's Attention layer that the cache write reads.
    layer = SimpleNamespace(isa=_get_attn_isa(torch.float32, block_size, head_dim, "auto"),
                            _k_scale_float=1.0, _v_scale_float=1.0)

    prefix_len, nodes = 45, 7
    accepted, num_accepted = torch.tensor([[1, 3, 6]]), torch.tensor([3])
    table = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    num_blocks = 4
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(prefix_len + nodes + 1, num_kv_heads, head_dim, generator=generator)
    values = torch.randn_like(keys)

    def slots(positions):
        return (table[0, positions // block_size].long() * block_size
                + positions % block_size)

    def empty_cache():
        return torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_dim)

    def write(cache, rows, positions):  # vLLM's own write, no mirror
        CPUAttentionBackendImpl.do_kv_cache_update(impl, layer, keys[rows], values[rows],
                                                   cache, slots(positions))

    def next_token_attention(cache, query):
        """vLLM's kernel for one query at position prefix_len + 3."""
        seq_lens = torch.tensor([prefix_len + 4], dtype=torch.int32)
        query_start_loc = torch.tensor([0, 1], dtype=torch.int32)
        key_cache, value_cache = cache.view(
            num_blocks, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
        output = torch.empty(1, num_heads, head_dim)
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            seq_lens=seq_lens, dtype=torch.float32, query_start_loc=query_start_loc,
            causal=True, sliding_window_size=-1, isa=layer.isa, enable_kv_split=False)
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=output,
            query_start_loc=query_start_loc, seq_lens=seq_lens, scale=impl.scale,
            causal=True, alibi_slopes=None, sliding_window=-1, block_table=table,
            softcap=0, scheduler_metadata=metadata, s_aux=None, dynamic_causal=None,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        return output

    # Target-only: the prefix, the accepted tokens and the next token, in order.
    chain_rows = torch.cat((torch.arange(prefix_len), prefix_len + accepted[0],
                            torch.tensor([prefix_len + nodes])))
    chain_cache = empty_cache()
    write(chain_cache, chain_rows, torch.arange(prefix_len + 4))
    # Tree step: prefix and every node, then compaction, then the next token.
    tree_cache = empty_cache()
    impl.do_kv_cache_update(layer, keys[: prefix_len + nodes], values[: prefix_len + nodes],
                            tree_cache, slots(torch.arange(prefix_len + nodes)))
    uncompacted = tree_cache.clone()
    source, destination = compaction_moves(accepted, num_accepted,
                                           torch.tensor([prefix_len]), table, block_size)
    impl.compact(layer, tree_cache, source, destination)
    for cache in (tree_cache, uncompacted):
        write(cache, torch.tensor([prefix_len + nodes]), torch.tensor([prefix_len + 3]))

    query = torch.randn(1, num_heads, head_dim, generator=generator)
    expected = next_token_attention(chain_cache, query)
    assert torch.equal(next_token_attention(tree_cache, query), expected)
    assert not torch.allclose(next_token_attention(uncompacted, query), expected, atol=1e-3)
    chain_keys, chain_values = impl.reader.read(tree_cache, slots(prefix_len + torch.arange(3)))
    assert torch.equal(chain_keys, keys[prefix_len + accepted[0]])
    assert torch.equal(chain_values, values[prefix_len + accepted[0]])


def test_tree_steps_leave_the_kv_a_target_only_run_caches(tiny_pair, tmp_path):
    """One request through several tree steps: vLLM's cache of every target
    layer then holds, for the prompt and the accepted tokens, the K/V a
    target-only run cached. Four full blocks of 32 are compared; the
    first request of a fresh engine gets blocks 1, 2, ... in both runs."""
    import random

    from conftest import run_engine

    rng = random.Random(2)
    prompt = [rng.randrange(3, 259) for _ in range(70)]
    job = {"model": tiny_pair.target, "prompts": [prompt], "max_tokens": 60,
           "kv_blocks": [1, 2, 3, 4], "engine_kwargs": {"block_size": 32}}
    target_only, _ = run_engine(job, tmp_path / "target_only")
    job["speculative_config"] = {"method": "specextend", "model": tiny_pair.draft,
                                 "tree": True, "tree_nodes": 12, "tree_max_depth": 5}
    trees, log = run_engine(job, tmp_path / "trees")
    assert "moved the first accepted tree nodes to chain slots" in log
    assert trees["token_ids"] == target_only["token_ids"]
    for layer, (expected, got) in enumerate(zip(target_only["kv_blocks"], trees["kv_blocks"])):
        expected, got = torch.tensor(expected), torch.tensor(got)
        assert expected.abs().sum() > 0, "the compared blocks were never written"
        assert torch.allclose(got, expected, atol=1e-4), f"target layer {layer}"
