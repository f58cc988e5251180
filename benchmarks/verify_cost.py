"""What verifying drafts costs the target's forward on CPU, by part: vLLM's
CPU attention kernel over a long context and vLLM's own matrix products
(the path `dispatch_cpu_unquantized_gemm` picks, oneDNN here), for a step
of 1 to 8 tokens (the last sampled token and its drafts):

    python benchmarks/verify_cost.py [--contexts 2048 8192] [--tokens 1 2 3 4 8] \
        --out benchmarks/results/verify_cost_bf16_cpu

Shapes default to Qwen2.5-Coder-1.5B (28 layers, 12 heads, 2 KV heads,
head_dim 128, hidden 1536, MLP 8960, tied 151,936-token vocabulary). Each
part runs over four layers' own weights and caches (one layer's would stay
in the CPU's cache), timed (median of --repeats) and scaled to the layers.
What a verified draft adds to a step is the difference between rows.
Attention is also timed with each query token passed as a one-token
request of its own (`attention_one_token_rows_ms`): vLLM's scheduler
splits a request's KV across threads only for one-token queries, so a
step of 2 tokens at batch 1 runs its attention on fewer threads. CPU
only; writes JSON (ms per forward, per part) and a PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import torch

from draft_attention import BLOCK_SIZE, PackedCache
from kernel_timing import save_results, seconds
from machine import machine

COPIES = 4  # layers' weights and caches cycled through


def linear(out_features: int, in_features: int, dtype: torch.dtype):
    """A weight behind vLLM's CPU GEMM dispatch, as its linear layers load."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = SimpleNamespace(weight=torch.randn(out_features, in_features, dtype=dtype) * 0.02,
                            bias=None)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def attention(context: int, tokens: int, args, dtype: torch.dtype) -> dict:
    """vLLM's CPU kernel for `tokens` queries at the end of a `context`-token
    causal context, one call per layer's cache (`COPIES` of them), as its
    CPU backend calls it by default (the KV split on: "one request"), and
    with each query token as a one-token request of its own ("one-token
    rows"). The two are checked to give the same output."""
    num_blocks = -(-context // BLOCK_SIZE)
    block_table = torch.randperm(num_blocks, dtype=torch.int32)[None]
    query = torch.randn(tokens, args.heads, args.head_dim, dtype=dtype)
    caches = []
    for _ in range(COPIES):
        cache = PackedCache(num_blocks, args.kv_heads, args.head_dim, args.heads, dtype)
        cache.cache.normal_()
        caches.append(cache)
    def layer_calls(one_token_rows: bool) -> list:
        return [cache.attention(context, block_table, tokens, kv_split=True,
                                one_token_rows=one_token_rows) for cache in caches]

    request_calls, rows_calls = layer_calls(False), layer_calls(True)
    for request_call, rows_call in zip(request_calls, rows_calls):
        torch.testing.assert_close(rows_call(query), request_call(query), atol=2e-2, rtol=2e-2)
    return {"one request": lambda: [call(query) for call in request_calls],
            "one-token rows": lambda: [call(query) for call in rows_calls]}


def measure(args) -> dict:
    dtype = getattr(torch, args.dtype)
    q_size, kv_size = args.heads * args.head_dim, args.kv_heads * args.head_dim
    shapes = [(q_size + 2 * kv_size, args.hidden), (args.hidden, q_size),
              (2 * args.mlp, args.hidden), (args.hidden, args.mlp)]  # qkv, o, gate_up, down
    # Distinct weights for `COPIES` layers: one layer's would stay in the cache.
    layer_linears = [(linear(*shape, dtype), shape[1]) for _ in range(COPIES)
                     for shape in shapes]
    lm_head = linear(args.vocab, args.hidden, dtype)
    cpu = torch.device("cpu")
    rows = []
    for tokens in args.tokens:
        inputs = {width: torch.randn(tokens, width, dtype=dtype) for _, width in layer_linears}

        def matmuls():
            for f, width in layer_linears:
                f(inputs[width])

        hidden = torch.randn(tokens, args.hidden, dtype=dtype)
        per_layer = args.layers / COPIES
        layouts = {str(context): attention(context, tokens, args, dtype)
                   for context in args.contexts}

        def attention_ms(layout: str) -> dict:
            return {context: 1e3 * per_layer * seconds(calls[layout], args.repeats, cpu)
                    for context, calls in layouts.items()}

        row = {"tokens": tokens,
               "layer_matmuls_ms": 1e3 * per_layer * seconds(matmuls, args.repeats, cpu),
               "lm_head_ms": 1e3 * seconds(lambda: lm_head(hidden), args.repeats, cpu),
               "attention_ms": attention_ms("one request"),
               "attention_one_token_rows_ms": attention_ms("one-token rows")}
        print(row, flush=True)
        rows.append(row)
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    return {"machine": machine(), "settings": settings, "rows": rows}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(tokens, [r["layer_matmuls_ms"] for r in rows], "o-", label="layers' matmuls")
    ax.plot(tokens, [r["lm_head_ms"] for r in rows], "o-", label="lm_head")
    for index, context in enumerate(rows[0]["attention_ms"]):
        ax.plot(tokens, [r["attention_ms"][context] for r in rows], "o--", color=f"C{index + 2}",
                label=f"attention, {context}-token context")
        ax.plot(tokens, [r["attention_one_token_rows_ms"][context] for r in rows], "x:",
                color=f"C{index + 2}", label=f"attention, {context}, one-token rows")
    ax.set_xlabel("tokens in the step (1 + drafts verified)")
    ax.set_ylabel("ms per forward")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{results['machine']}, {results['settings']['dtype']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--mlp", type=int, default=8960)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    save_results(measure(args), Path(args.out), plot)


if __name__ == "__main__":
    main()
