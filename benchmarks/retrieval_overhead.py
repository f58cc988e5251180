"""Cost of one CMR refresh's choice (chunk scoring, selection, working-cache
layout) as a share of one target decode step, at several context lengths,
measured side by side in one run.

    python benchmarks/retrieval_overhead.py [--lengths 2048 4096 8100]

Target step: vLLM target-only engine on the tiny pair, batch 1, eager mode,
prefix caching off: (time of 1 + N new tokens - time of 1 new token) / N.
Refresh: what the plugin runs on vLLM's CPU build, on the target's
final-layer shapes: the final layer's keys read back from vLLM's packed
cache, dense chunk scores, top-k selection and the layout (filling the
draft's working caches comes on top, per draft layer).
Writes JSON and a PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from machine import machine

RESULTS = Path(__file__).parent / "results"


def target_step_seconds(llm, length: int, new_tokens: int) -> float:
    from vllm import SamplingParams

    rng = random.Random(length)
    prompt = {"prompt_token_ids": [rng.randrange(3, 259) for _ in range(length)]}

    def timed(max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start

    timed(1)  # warm-up at this length
    return (timed(1 + new_tokens) - timed(1)) / new_tokens


def refresh_seconds(length: int, hf_config, settings, block_size: int, repeats: int) -> float:
    from types import SimpleNamespace

    import torch
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

    from vllm_specextend.paged_cache import slots_of
    from vllm_specextend.retrieval.chunk_scores import chunk_scores_dense
    from vllm_specextend.retrieval.working_cache import (
        select_chunks,
        window_starts,
        working_cache_layout,
    )
    from vllm_specextend.vllm_glue.kv_cache_reader import PackedCPUKVReader

    num_heads = hf_config.num_attention_heads
    num_kv_heads = hf_config.num_key_value_heads
    head_dim = hf_config.head_dim
    num_blocks = -(-length // block_size)
    block_table = torch.randperm(num_blocks, dtype=torch.int32)[None]
    isa = _get_attn_isa(torch.float32, block_size, head_dim, "auto")
    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_dim)
    positions = torch.arange(length)[None]
    slots = slots_of(block_table, positions, block_size).flatten()
    keys = torch.randn(length, num_kv_heads, head_dim)
    impl.do_kv_cache_update(SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0),
                            keys, keys, kv_cache, slots)
    reader = PackedCPUKVReader(isa, num_kv_heads, head_dim, block_size, torch.float32)
    query = torch.randn(1, num_heads, head_dim)
    context = torch.tensor([length])
    geometry = settings.geometry(draft_max_positions=2048, num_speculative_tokens=4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gathered, _ = reader.read(kv_cache, slots)
        scores = chunk_scores_dense(query, gathered[None], context, settings.chunk_size)
        window_start = window_starts(context, settings.chunk_size, settings.recent_tokens)
        kept, num_kept = select_chunks(scores, window_start, settings.chunk_size,
                                       geometry.top_k_chunks)
        working_cache_layout(kept, num_kept, window_start, context, settings.chunk_size,
                             geometry.capacity)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    lengths = [r["context_len"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, [100 * r["refresh_share_of_target_step"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("refresh time / target step (%)")
    ax.set_title(f"CMR refresh cost, tiny pair\n{results['machine']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8100])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--name", default="retrieval_overhead_cpu")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoConfig
    from vllm import LLM

    from vllm_specextend.config import SpecExtendConfig
    from vllm_specextend.models.tiny import TARGET_MAX_POSITIONS, build_tiny_pair

    pair = build_tiny_pair()
    settings = SpecExtendConfig()
    block_size = 32  # what the plugin picks on CPU for chunk_size 32
    llm = LLM(model=pair.target, max_model_len=TARGET_MAX_POSITIONS,
              dtype="float32", gpu_memory_utilization=0.1, enforce_eager=True,
              enable_prefix_caching=False, block_size=block_size)
    hf_config = AutoConfig.from_pretrained(pair.target)
    rows = []
    for length in args.lengths:
        step = target_step_seconds(llm, length, args.new_tokens)
        refresh = refresh_seconds(length, hf_config, settings, block_size, args.repeats)
        rows.append({"context_len": length, "target_step_ms": 1e3 * step,
                     "refresh_ms": 1e3 * refresh, "refresh_share_of_target_step": refresh / step})
        print(f"{length:>6} tokens: target step {1e3 * step:.2f} ms, refresh "
              f"{1e3 * refresh:.3f} ms ({100 * refresh / step:.1f}% of a step)")
    results = {"machine": machine(), "model": "tiny pair (4-layer target, 4 heads x 32, GQA 2)",
               "settings": settings.model_dump(), "target_engine": "vLLM 0.32 CPU, eager, batch 1",
               "refresh_impl": "read from vLLM's packed cache + dense scores (CPU)",
               "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
