"""Tree-verification attention: Hybrid Tree Attention vs the full masked
attention (torch SDPA) vs FlexAttention with a block mask, side by side in
one run, for long cached prefixes and trees of 16/32/64 nodes.

    python benchmarks/tree_attention.py [--prefixes 1024 ... 32768] [--nodes 16 32 64]

One request per call; its prefix and tree sit in a paged cache (shuffled
blocks). Methods:
  hta          prefix part (split-KV, LSE) + tree part (ancestor mask) + merge:
               the Triton kernels on GPU, their torch path on CPU
  sdpa_masked  gather prefix + tree from the cache, one SDPA call under the
               [nodes, prefix + nodes] mask: verification without HTA
  sdpa_masked_contiguous  the same SDPA call on K/V already contiguous
               (its best case: no gather)
  flex         FlexAttention (compiled) with a block mask, on the contiguous
               K/V; skipped with its error where it does not run
Writes JSON (microseconds, ratios to hta) and a PNG. The target's attention
shape defaults to Qwen2.5-Coder-1.5B (12 heads, 2 KV heads, head_dim 128).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from kernel_timing import save_results, seconds
from machine import machine

RESULTS = Path(__file__).parent / "results"
METHODS = ["hta", "sdpa_masked", "sdpa_masked_contiguous", "flex"]


def opt_tree_parents(nodes: int, rng: random.Random) -> list[int]:
    """OPT-Tree-like shape: each node hangs under one of the few newest."""
    return [-1] + [rng.randrange(max(0, i - 4), i) for i in range(1, nodes)]


def make_case(prefix_len, nodes, num_heads, num_kv_heads, head_dim, block_size, dtype, device):
    from vllm_specextend.attention.hybrid_tree_attention import ancestor_bitmasks

    rng = random.Random(prefix_len * 131 + nodes)
    total = prefix_len + nodes
    num_blocks = -(-total // block_size)
    block_table = torch.randperm(num_blocks, dtype=torch.int32)[None].to(device)
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, dtype=dtype, device=device)
    value_cache = torch.randn(shape, dtype=dtype, device=device)
    query = torch.randn(nodes, num_heads, head_dim, dtype=dtype, device=device)
    parents = torch.tensor(opt_tree_parents(nodes, rng))
    tree_start_loc = torch.tensor([0, nodes], dtype=torch.int32)
    masks = ancestor_bitmasks(parents, tree_start_loc)
    local = torch.arange(nodes)
    visible = torch.ones(nodes, total, dtype=torch.bool)
    visible[:, prefix_len:] = ((masks[:, None] >> local[None, :]) & 1).bool()
    return {"query": query, "key_cache": key_cache, "value_cache": value_cache,
            "block_table": block_table, "prefix_lens": torch.tensor([prefix_len], dtype=torch.int32,
                                                                    device=device),
            "tree_start_loc": tree_start_loc.to(device), "masks": masks.to(device),
            "visible": visible.to(device), "block_size": block_size, "total": total}


def gathered(case, cache):
    from vllm_specextend.paged_cache import slots_of

    positions = torch.arange(case["total"], device=cache.device)
    slots = slots_of(case["block_table"][0], positions, case["block_size"])
    return cache[slots].transpose(0, 1)  # [kv_heads, total, head_dim]


def method_calls(case, flex_compiled):
    from vllm_specextend.attention.hybrid_tree_attention import (
        hybrid_tree_attention,
        hybrid_tree_attention_cpu,
    )

    query = case["query"]
    args = (query, case["key_cache"], case["value_cache"], case["block_table"],
            case["prefix_lens"], case["tree_start_loc"], case["masks"], case["block_size"])
    q = query.transpose(0, 1)[None]
    contiguous_k = gathered(case, case["key_cache"])[None].contiguous()
    contiguous_v = gathered(case, case["value_cache"])[None].contiguous()

    def read_kv(slots):
        return case["key_cache"][slots], case["value_cache"][slots]

    def hta():
        if query.is_cuda:
            return hybrid_tree_attention(*args, max_prefix_len=case["total"] - query.shape[0])
        return hybrid_tree_attention_cpu(query, read_kv, *args[3:])

    def sdpa(k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=case["visible"], enable_gqa=True)

    calls = {
        "hta": hta,
        "sdpa_masked": lambda: sdpa(gathered(case, case["key_cache"])[None],
                                    gathered(case, case["value_cache"])[None]),
        "sdpa_masked_contiguous": lambda: sdpa(contiguous_k, contiguous_v),
    }
    if flex_compiled is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        visible = case["visible"]
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: visible[q_idx, kv_idx],
                                       None, None, q.shape[2], case["total"],
                                       device=str(query.device))
        calls["flex"] = lambda: flex_compiled(q, contiguous_k, contiguous_v,
                                              block_mask=block_mask, enable_gqa=True)
    return calls


def compiled_flex():
    """(compiled flex_attention, None) or (None, why it is unavailable)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention

        # One compiled graph per (prefix, tree) shape of the sweep.
        torch._dynamo.config.recompile_limit = 64
        return torch.compile(flex_attention, dynamic=False), None
    except Exception as exc:  # noqa: BLE001 - reported in the results
        return None, repr(exc)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    node_counts = sorted({r["nodes"] for r in results["rows"]})
    fig, axes = plt.subplots(1, len(node_counts), figsize=(5 * len(node_counts), 4), sharey=True)
    for ax, nodes in zip(list(axes) if len(node_counts) > 1 else [axes], node_counts):
        rows = [r for r in results["rows"] if r["nodes"] == nodes]
        for method in METHODS:
            points = [(r["prefix_len"], r["us"][method]) for r in rows
                      if r["us"].get(method) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"tree of {nodes} nodes")
        ax.set_xlabel("cached prefix (tokens)")
        ax.grid(True, alpha=0.3)
    (axes[0] if len(node_counts) > 1 else axes).set_ylabel("microseconds per call")
    (axes[0] if len(node_counts) > 1 else axes).legend()
    fig.suptitle(f"Tree verification attention, {results['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefixes", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--nodes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", default=None, help="default: results/tree_attention_<device>")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # one thread per core this process may run on
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    device_name = (torch.cuda.get_device_name() if device.type == "cuda"
                   else f"CPU: {machine()}, torch threads: {torch.get_num_threads()}")
    flex, flex_error = (None, "disabled (--no-flex)") if args.no_flex else compiled_flex()
    rows = []
    for prefix_len in args.prefixes:
        for nodes in args.nodes:
            case = make_case(prefix_len, nodes, args.heads, args.kv_heads, args.head_dim,
                             args.block_size, dtype, device)
            us = {}
            for method, call in method_calls(case, flex).items():
                try:
                    us[method] = 1e6 * seconds(call, args.repeats, device)
                except Exception as exc:  # noqa: BLE001 - FlexAttention may not run here
                    if method != "flex":
                        raise
                    flex, flex_error = None, repr(exc)
            row = {"prefix_len": prefix_len, "nodes": nodes, "us": us,
                   "vs_hta": {m: t / us["hta"] for m, t in us.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    results = {"device": device_name, "dtype": str(dtype), "torch": torch.__version__,
               "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
               "block_size": args.block_size, "flex_unavailable": flex_error, "rows": rows}
    save_results(results, Path(args.out) if args.out
                 else RESULTS / f"tree_attention_{device.type}", plot)


if __name__ == "__main__":
    main()
