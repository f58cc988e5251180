"""The draft's attention in one decode step, per layer: stock vLLM's CPU
kernel over the whole context (what `draft_model` runs) vs SpecExtend's
compact attention over the working set (what `specextend` runs), side by
side in one run, for contexts of 1K to 32K tokens.

    python benchmarks/draft_attention.py [--contexts 1024 ... 32768]

Methods (one query token, as in every draft forward after the first):
  vllm_full_context    vLLM's `cpu_attention_with_kv_cache` over the whole
                       context in its packed cache (block size 128, vLLM's
                       CPU default)
  working_set          `working_set_attention_cpu` over what CMR keeps with
                       the default settings (k=4): the whole context up to
                       the 1,300-token budget, else the working set selected
                       for random chunk scores, read from the plain mirror and
                       rotated at compact positions
Writes JSON (microseconds, ratios to vllm_full_context) and a PNG. Shapes
default to the Qwen2.5-Coder-0.5B draft (14 heads, 2 KV heads, head_dim 64).
CPU only: vLLM's CPU kernel is the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from kernel_timing import save_results, seconds
from machine import machine
from vllm_specextend.config import SpecExtendConfig
from vllm_specextend.retrieval.working_set import select_working_sets, working_set_positions

RESULTS = Path(__file__).parent / "results"
METHODS = ["vllm_full_context", "working_set"]
VLLM_CPU_BLOCK_SIZE = 128


def kept_positions(context_len: int, generator: torch.Generator) -> torch.Tensor:
    """What CMR's draft attends to under the default settings (k=4): the
    whole context within the budget, else the working set that
    `select_working_sets` keeps for random chunk scores."""
    settings = SpecExtendConfig()
    budget = settings.working_cache_budget(4)
    if context_len <= budget:
        return torch.arange(context_len)
    scores = torch.rand(1, -(-context_len // settings.chunk_size), generator=generator)
    lens = torch.tensor([context_len])
    sets = select_working_sets(scores, lens, settings.chunk_size, settings.top_k_chunks,
                               settings.recent_tokens)
    positions, count = working_set_positions(sets, lens, context_len, budget)
    return positions[0, : int(count[0])]


def method_calls(context_len, args, generator):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_specextend.attention.working_set_attention import working_set_attention_cpu

    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    block_size = VLLM_CPU_BLOCK_SIZE
    num_blocks = -(-context_len // block_size)
    block_table = torch.randperm(num_blocks, dtype=torch.int32, generator=generator)[None]
    slots = (block_table[0].long()[:, None] * block_size + torch.arange(block_size)).flatten()
    slots = slots[:context_len]
    keys = torch.randn(context_len, kv_heads, head_dim, generator=generator)
    values = torch.randn(context_len, kv_heads, head_dim, generator=generator)
    query = torch.randn(1, heads, head_dim, generator=generator)
    scale = head_dim ** -0.5

    # vLLM's packed cache, written by vLLM's own op.
    isa = _get_attn_isa(torch.float32, block_size, head_dim, "auto")
    packed = torch.zeros(num_blocks, kv_heads, 2 * block_size, head_dim)
    key_cache, value_cache = packed.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)
    seq_lens = torch.tensor([context_len], dtype=torch.int32)
    query_start_loc = torch.tensor([0, 1], dtype=torch.int32)
    output = torch.empty(1, heads, head_dim)

    def vllm_full_context():
        # The metadata is built once per step in vLLM, shared by the layers.
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=output,
            query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0,
            scheduler_metadata=metadata, s_aux=None, dynamic_causal=None, k_scale=1.0,
            v_scale=1.0, kv_cache_dtype="auto")

    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        seq_lens=seq_lens, dtype=torch.float32, query_start_loc=query_start_loc,
        causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)

    # SpecExtend's plain mirror (slot-indexed) and the working set's rows.
    key_mirror = torch.zeros(num_blocks * block_size, kv_heads, head_dim)
    value_mirror = torch.zeros_like(key_mirror)
    key_mirror[slots], value_mirror[slots] = keys, values
    positions = kept_positions(context_len - 1, generator)
    positions = torch.cat((positions, torch.tensor([context_len - 1])))[None]
    num_keys = torch.tensor([positions.shape[1]], dtype=torch.int32)
    cos_sin = torch.randn(32768, head_dim)

    def working_set():
        working_set_attention_cpu(query, key_mirror, value_mirror, block_table,
                                  query_start_loc, positions, num_keys, cos_sin, block_size,
                                  scale)

    calls = {"vllm_full_context": vllm_full_context, "working_set": working_set}
    return calls, int(num_keys[0])


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
        print(json.dumps(row), flush=True)
    results = {"device": f"CPU: {machine()}, torch threads: {torch.get_num_threads()}",
               "torch": torch.__version__, "heads": args.heads, "kv_heads": args.kv_heads,
               "head_dim": args.head_dim, "rows": rows}
    save_results(results, Path(args.out), plot)


if __name__ == "__main__":
    main()
