"""The draft's attention in one decode step, per layer, side by side in one
run for contexts of 1K to 32K tokens:

    python benchmarks/draft_attention.py [--contexts 1024 ... 32768] [--draft-window 2048]

Methods (one query token, as in every draft forward after the first; each
writes the token's key and value, then attends):
  vllm_full_context  vLLM's cache write, then `cpu_attention_with_kv_cache`
                     over the whole context in its packed cache (what
                     `draft_model` runs)
  specextend         what the plugin runs now: up to `retrieval_min_len`
                     tokens the same as vllm_full_context (sliding window);
                     past it, the working-cache path of a draft step: the
                     query and key already at compact positions, the key
                     written to the working cache only (a drafted token is
                     not written to vLLM's cache), and vLLM's kernel over the
                     working cache (`capacity` slots)
  previous_path      the path before the working cache (kept here as the
                     baseline): the working set gathered from a plain mirror
                     and rotated at compact positions on every call, then
                     grouped matmuls
Writes JSON (microseconds, ratios to vllm_full_context) and a PNG. Shapes
default to the Qwen2.5-Coder-0.5B draft (14 heads, 2 KV heads, head_dim 64),
with the working cache of a 2,048-position draft window. CPU only: vLLM's
CPU kernel is the baseline.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from kernel_timing import save_results, seconds
from machine import machine
from vllm_specextend.attention.rope import rotate_by
from vllm_specextend.config import SpecExtendConfig
from vllm_specextend.retrieval.working_cache import (
    select_chunks,
    window_starts,
    working_cache_layout,
)

RESULTS = Path(__file__).parent / "results"
METHODS = ["vllm_full_context", "specextend", "previous_path"]
BLOCK_SIZE = 32  # what the plugin picks on CPU for chunk_size 32
NUM_SPECULATIVE_TOKENS = 4


class PackedCache:
    """A layer's cache in vLLM's CPU layout, written and attended by vLLM's ops."""

    def __init__(self, num_blocks, kv_heads, head_dim, heads, dtype=torch.float32):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backend import AttentionType
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

        self.ops, self.heads, self.kv_heads, self.head_dim = ops, heads, kv_heads, head_dim
        self.dtype = dtype
        self.isa = _get_attn_isa(dtype, BLOCK_SIZE, head_dim, "auto")
        self.layer = SimpleNamespace(isa=self.isa, _k_scale_float=1.0, _v_scale_float=1.0)
        self.impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
        self.impl.attn_type, self.impl.kv_cache_dtype = AttentionType.DECODER, "auto"
        self.cache = torch.zeros(num_blocks, kv_heads, BLOCK_SIZE, 2 * head_dim, dtype=dtype)

    def write(self, keys, values, slots):
        self.impl.do_kv_cache_update(self.layer, keys, values, self.cache, slots)

    def attention(self, seq_len: int, block_table: torch.Tensor, tokens: int = 1,
                  kv_split: bool = False, one_token_rows: bool = False):
        """A call as vLLM's CPU backend makes it for one request's step of
        `tokens` queries, the last at `seq_len` (metadata built once per
        step, outside the per-layer call). `one_token_rows`: each query
        token passed as a request of its own over the same blocks, ending at
        its own position (the same causal attention; vLLM's scheduler splits
        the KV across threads only for one-token queries)."""
        if one_token_rows:
            seq_lens = torch.arange(seq_len - tokens + 1, seq_len + 1, dtype=torch.int32)
            query_start_loc = torch.arange(tokens + 1, dtype=torch.int32)
            block_table = block_table.expand(tokens, -1).contiguous()
        else:
            seq_lens = torch.tensor([seq_len], dtype=torch.int32)
            query_start_loc = torch.tensor([0, tokens], dtype=torch.int32)
        metadata = self.ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(seq_lens), num_heads=self.heads, num_kv_heads=self.kv_heads,
            head_dim=self.head_dim, seq_lens=seq_lens, dtype=self.dtype,
            query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa=self.isa,
            enable_kv_split=kv_split)
        key_cache, value_cache = self.cache.view(
            self.cache.shape[0], self.kv_heads, 2 * BLOCK_SIZE, self.head_dim).chunk(2, dim=2)
        output = torch.empty(tokens, self.heads, self.head_dim, dtype=self.dtype)

        def call(query):
            self.ops.cpu_attention_with_kv_cache(
                query=query, key_cache=key_cache, value_cache=value_cache, output=output,
                query_start_loc=query_start_loc, seq_lens=seq_lens, scale=self.head_dim ** -0.5,
                causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table,
                softcap=0, scheduler_metadata=metadata, s_aux=None, dynamic_causal=None,
                k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
            return output

        return call


def previous_path(query, key_mirror, value_mirror, slots, cos_sin, scale):
    """The draft attention before the working cache: gather the working set
    from a plain mirror of un-rotated keys, rotate it at compact positions
    0..n-1, one grouped matmul per KV head."""
    n, num_heads, head_dim = len(slots), query.shape[1], query.shape[2]
    num_kv_heads = key_mirror.shape[1]
    compact = torch.arange(n)
    keys = rotate_by(key_mirror.index_select(0, slots), compact, cos_sin).transpose(0, 1)
    values = value_mirror.index_select(0, slots).transpose(0, 1)
    q = rotate_by(query, compact[-1:], cos_sin)
    grouped = q.view(num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = torch.matmul(grouped, keys.transpose(1, 2)) * scale
    return torch.matmul(logits.softmax(dim=-1), values)


def method_calls(context_len, args, generator):
    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    settings = SpecExtendConfig(draft_window=args.draft_window)
    geometry = settings.geometry(draft_max_positions=args.draft_window,
                                 num_speculative_tokens=NUM_SPECULATIVE_TOKENS)
    num_blocks = -(-context_len // BLOCK_SIZE)
    block_table = torch.randperm(num_blocks, dtype=torch.int32, generator=generator)[None]
    slots = (block_table[0].long()[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()
    slots = slots[:context_len]
    keys = torch.randn(context_len, kv_heads, head_dim, generator=generator)
    values = torch.randn(context_len, kv_heads, head_dim, generator=generator)
    query = torch.randn(1, heads, head_dim, generator=generator)
    cos_sin = torch.randn(65536, head_dim)
    main = PackedCache(num_blocks, kv_heads, head_dim, heads)
    main.write(keys, values, slots)
    full_context_attention = main.attention(context_len, block_table)

    def full_context():
        main.write(keys[-1:], values[-1:], slots[-1:])
        return full_context_attention(query)

    # What the working cache holds for random chunk scores, as a refresh lays it out.
    cached = torch.tensor([context_len - 1])
    scores = torch.rand(1, -(-context_len // settings.chunk_size), generator=generator)
    window_start = window_starts(cached, settings.chunk_size, settings.recent_tokens)
    kept, num_kept = select_chunks(scores, window_start, settings.chunk_size,
                                   geometry.top_k_chunks)
    layout = working_cache_layout(kept, num_kept, window_start, cached, settings.chunk_size,
                                  geometry.capacity)
    length = min(int(layout.lengths[0]), context_len - 1)
    working_positions = torch.cat((layout.source_positions[0, :length],
                                   torch.tensor([context_len - 1])))
    blocks_per_cache = -(-geometry.capacity // BLOCK_SIZE)
    working = PackedCache(blocks_per_cache, kv_heads, head_dim, heads)
    working.write(keys[working_positions], values[working_positions],
                  torch.arange(len(working_positions)))
    working_table = torch.arange(blocks_per_cache, dtype=torch.int32)[None]
    compact_attention = working.attention(len(working_positions), working_table)
    new_slot = torch.tensor([len(working_positions) - 1])

    def working_cache_layer():
        working.write(keys[-1:], values[-1:], new_slot)
        return compact_attention(query)

    uses_working_cache = context_len > geometry.retrieval_min_len
    calls = {
        "vllm_full_context": full_context,
        "specextend": working_cache_layer if uses_working_cache else full_context,
        "previous_path": lambda: previous_path(query, keys, values, working_positions, cos_sin,
                                               head_dim ** -0.5),
    }
    return calls, len(working_positions) if uses_working_cache else context_len


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    contexts = [r["context_len"] for r in results["rows"]]
    for method in METHODS:
        ax.loglog(contexts, [r["us"][method] for r in results["rows"]], marker="o",
                  label=method, base=2)
    ax.set(xlabel="context (tokens)", ylabel="microseconds per layer, one decode token",
           title=f"Draft attention, {results['device']}")
    ax.title.set_fontsize(8)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--draft-window", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=str(RESULTS / "draft_attention_cpu"))
    args = parser.parse_args()

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for context_len in args.contexts:
        calls, keys_attended = method_calls(context_len, args, generator)
        us = {method: 1e6 * seconds(call, args.repeats, torch.device("cpu"))
              for method, call in calls.items()}
        row = {"context_len": context_len, "keys_attended": keys_attended, "us": us,
               "vs_vllm": {m: t / us["vllm_full_context"] for m, t in us.items()}}
        rows.append(row)
        print(row, flush=True)
    results = {"device": f"CPU: {machine()}, torch threads: {torch.get_num_threads()}",
               "torch": torch.__version__, "heads": args.heads, "kv_heads": args.kv_heads,
               "head_dim": args.head_dim, "draft_window": args.draft_window, "rows": rows}
    save_results(results, Path(args.out), plot)


if __name__ == "__main__":
    main()
