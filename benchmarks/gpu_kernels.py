"""Every Triton kernel of the plugin, checked and timed on a GPU against the
best baselines on the machine, side by side in one run. Needs torch and
Triton only (no vLLM: the lent GPU machines cannot install it).

    python benchmarks/gpu_kernels.py                                # H100 / H200
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --smoke     # CPU, tiny shapes

1. Correctness, fp16 and bf16, against the PyTorch references: chunk
   scoring (split-KV LSE pass + chunk pass), Hybrid Tree Attention (prefix
   part, tree part, LSE merge) and the draft's tree attention, at
   Llama-3.1-8B's attention shape (32 query heads, 8 KV heads, head_dim
   128) and Qwen2.5-1.5B's (12, 2, 128), paged K/V with block size 16,
   contexts 4K-128K, batches 1, 8 and 32 (32 up to 16K for the tree
   kernels, whose dense references grow with nodes x context), trees of
   16, 32 and 64 nodes.
2. Timing: CUDA events after warm-up, median of repeats, against PyTorch
   SDPA (flash and memory-efficient backends; a dense mask for trees, K/V
   gathered from the paged cache with and without the gather counted),
   FlexAttention (compiled, with a block mask), the torch references where
   they fit, and the bandwidth bound: bytes of K/V read divided by the
   measured device-to-device copy bandwidth (bytes read and written).
3. The compass: one CMR refresh (chunk scores + selection + the working
   cache's layout, and filling a one-layer EAGLE head's working cache) as a
   share of an 8B-class target decode step at 16K and 128K, the step
   estimated as its weights' read time (8.03e9 bf16 parameters at the
   measured bandwidth) plus 32 layers of decode attention (timed, SDPA
   flash); goal at most 1%. And HTA verifying a 64-node tree over a 16K
   prefix against one single-token decode attention over the same prefix;
   goal at most 1.1x.
4. Launch configurations: where a kernel's tiles are large, the launcher's
   pick against other tiles and warp counts, timed, with the registers the
   driver loaded each with.
Writes benchmarks/results/gpu_kernels_<device>.json and .png with the
device, driver, torch and Triton versions.

    python benchmarks/gpu_kernels.py --resources    # any machine, no GPU

compiles every kernel for sm_90 and sm_80 instead (vllm_specextend.kernel_resources)
and writes benchmarks/results/kernel_resources.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = {"llama-3.1-8b": (32, 8, 128), "qwen2.5-1.5b": (12, 2, 128)}
CONTEXTS, BATCHES, TREES = (4096, 16384, 65536, 131072), (1, 8, 32), (16, 32, 64)
TREE_BATCH_32_MAX_CONTEXT = 16384
BLOCK_SIZE = 16
# Tiny shapes for --smoke (CPU, TRITON_INTERPRET=1): the same code paths.
SMOKE = dict(models={"tiny": (4, 2, 32)}, contexts=(48, 200), batches=(1, 2), trees=(4, 9))
LLAMA_8B_PARAMETERS = 8.03e9
TOLERANCE = {"float16": 3e-3, "bfloat16": 2e-2}


class Bench:
    """Device, timer and the pieces every measurement shares."""

    def __init__(self, smoke: bool):
        import torch

        self.torch = torch
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.repeats, self.warmup = (2, 1) if smoke else (20, 3)
        self.generator = torch.Generator(device=self.device).manual_seed(0)

    def seconds(self, fn) -> float:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return statistics.median(times)

    def randn(self, *shape, dtype):
        return self.torch.randn(*shape, generator=self.generator, device=self.device).to(dtype)

    def copy_bandwidth(self) -> float:
        """Bytes per second of a device-to-device copy, read + written."""
        numel = (1 << 20) if self.smoke else (1 << 30)
        source = self.torch.empty(numel, dtype=self.torch.uint8, device=self.device)
        target = self.torch.empty_like(source)
        return 2 * numel / self.seconds(lambda: target.copy_(source))

    def paged(self, batch: int, context: int, kv_heads: int, head_dim: int, dtype):
        """K/V caches [num_blocks, block_size, kv_heads, head_dim] with each
        request on scattered blocks, and its block table."""
        torch = self.torch
        blocks_per_row = -(-context // BLOCK_SIZE)
        order = torch.randperm(batch * blocks_per_row, device=self.device,
                               generator=self.generator)
        table = order.view(batch, blocks_per_row).to(torch.int32)
        shape = (batch * blocks_per_row, BLOCK_SIZE, kv_heads, head_dim)
        return self.randn(*shape, dtype=dtype), self.randn(*shape, dtype=dtype), table

    def gathered(self, cache, table, row: int, length: int):
        """[length, kv_heads, head_dim] of one request, in position order."""
        positions = self.torch.arange(length, device=self.device)
        return cache[table[row, positions // BLOCK_SIZE].long(), positions % BLOCK_SIZE]


def attention_cases(bench: Bench, shapes: dict, batches=None):
    """(model, (heads, kv_heads, head_dim), dtype, context, batch) for every
    attention shape of the sweep (or of `batches`), half precisions both."""
    for model, head_shape in shapes["models"].items():
        for dtype in (bench.torch.float16, bench.torch.bfloat16):
            for context in shapes["contexts"]:
                for batch in batches or shapes["batches"]:
                    yield model, head_shape, dtype, context, batch


def chunk_scoring(bench: Bench, shapes: dict, results: dict) -> None:
    torch = bench.torch
    from vllm_specextend.retrieval.chunk_scores import (
        chunk_scores,
        chunk_scores_dense,
        chunk_scores_reference,
    )

    cases = attention_cases(bench, shapes)
    for model, (heads, kv_heads, head_dim), dtype, context, batch in cases:
        keys, _, table = bench.paged(batch, context, kv_heads, head_dim, dtype)
        query = bench.randn(batch, heads, head_dim, dtype=dtype)
        lens = torch.full((batch,), context, dtype=torch.int32, device=bench.device)
        chunk = 32
        args = (query, keys, table, lens, BLOCK_SIZE, chunk)

        def kernel():
            return chunk_scores(*args, max_len=context)

        expected = chunk_scores_reference(*args)
        error = (kernel() - expected).abs().max().item()
        # Half-precision products: 1% of the largest chunk score.
        tolerance = 1e-2 * expected.max().item()
        case = dict(kernel="chunk_scores", model=model, dtype=str(dtype)[6:],
                    context=context, batch=batch, max_abs_error=error,
                    passed=error <= tolerance)
        results["correctness"].append(case)

        def gathered_dense():
            stacked = torch.stack([bench.gathered(keys, table, row, context)
                                   for row in range(batch)])
            return chunk_scores_dense(query, stacked, lens, chunk)

        key_bytes = batch * context * kv_heads * head_dim * keys.element_size()
        timing = dict(kernel="chunk_scores", model=model, dtype=case["dtype"],
                      context=context, batch=batch, seconds={
                          "triton": bench.seconds(kernel),
                          "torch_dense_with_gather": bench.seconds(gathered_dense)},
                      bandwidth_bound_s=key_bytes / results["copy_bandwidth"])
        results["timings"].append(timing)
        print(json.dumps(timing), flush=True)


def tree_inputs(bench: Bench, nodes: int, batch: int, context: int, heads, kv_heads,
                head_dim, dtype, seed: int):
    """A batch of OPT-Tree-like trees, each after a `context`-token prefix in
    a paged cache (tree nodes at the slots after it)."""
    torch = bench.torch
    from vllm_specextend.attention.hybrid_tree_attention import ancestor_bitmasks

    rng = random.Random(seed)
    parents = []
    for _ in range(batch):
        parents += [-1] + [rng.randrange(max(0, i - 4), i) for i in range(1, nodes)]
    start_loc = torch.arange(batch + 1, dtype=torch.int32) * nodes
    masks = ancestor_bitmasks(torch.tensor(parents), start_loc)
    keys, values, table = bench.paged(batch, context + nodes, kv_heads, head_dim, dtype)
    return dict(query=bench.randn(batch * nodes, heads, head_dim, dtype=dtype),
                key_cache=keys.flatten(0, 1), value_cache=values.flatten(0, 1),
                block_table=table, prefix_lens=torch.full((batch,), context, dtype=torch.int32,
                                                          device=bench.device),
                tree_start_loc=start_loc.to(bench.device), tree_masks=masks.to(bench.device))


def tree_attention(bench: Bench, shapes: dict, results: dict) -> None:
    """HTA (and its parts) and the draft's tree attention."""
    from vllm_specextend.attention.hybrid_tree_attention import (
        hybrid_tree_attention,
        merge_attention_states,
        node_rows_of,
        prefix_attention,
        tree_attention_reference,
        tree_part_attention,
    )

    cases = attention_cases(bench, shapes)
    for model, (heads, kv_heads, head_dim), dtype, context, batch in cases:
        if batch == 32 and context > TREE_BATCH_32_MAX_CONTEXT and not bench.smoke:
            continue
        for nodes in shapes["trees"]:
            case = tree_inputs(bench, nodes, batch, context, heads, kv_heads,
                               head_dim, dtype, seed=nodes)
            scale = head_dim ** -0.5
            common = (case["query"], case["key_cache"], case["value_cache"],
                      case["block_table"], case["prefix_lens"])
            expected = tree_attention_reference(
                *common, case["tree_start_loc"], case["tree_masks"], BLOCK_SIZE)

            def hta():
                return hybrid_tree_attention(
                    *common, case["tree_start_loc"], case["tree_masks"],
                    BLOCK_SIZE, max_prefix_len=context)

            rows = node_rows_of(case["tree_start_loc"], batch * nodes)
            prefix = prefix_attention(*common, case["tree_start_loc"], context,
                                      BLOCK_SIZE, scale)
            tree = tree_part_attention(*common, case["tree_start_loc"], rows,
                                       case["tree_masks"], BLOCK_SIZE, scale)
            merged, _ = merge_attention_states(*prefix, *tree)
            error = (hta().float() - expected.float()).abs().max().item()
            parts = (merged - expected.float()).abs().max().item()
            tolerance = TOLERANCE[str(dtype)[6:]]
            results["correctness"].append(dict(
                kernel="hybrid_tree_attention (prefix + tree part + merge)",
                model=model, dtype=str(dtype)[6:], context=context, batch=batch,
                nodes=nodes, max_abs_error=max(error, parts),
                passed=max(error, parts) <= tolerance))
            if batch == 1:
                time_tree_attention(bench, case, hta, model, dtype, context,
                                    nodes, results)


def time_tree_attention(bench, case, hta, model, dtype, context, nodes, results) -> None:
    """One tree: HTA against masked SDPA, FlexAttention and the bound."""
    torch = bench.torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    total = context + nodes
    positions = torch.arange(total, device=bench.device)
    slots = (case["block_table"][0, positions // BLOCK_SIZE].long() * BLOCK_SIZE
             + positions % BLOCK_SIZE)
    local = torch.arange(nodes, device=bench.device)
    visible = torch.ones(nodes, total, dtype=torch.bool, device=bench.device)
    visible[:, context:] = ((case["tree_masks"][:, None] >> local[None, :]) & 1).bool()
    query = case["query"].transpose(0, 1)[None]

    group = query.shape[1] // case["key_cache"].shape[1]

    def gathered():
        # SDPA's fused kernels want as many K/V heads as query heads.
        return tuple(cache[slots].transpose(0, 1)[None].repeat_interleave(group, dim=1)
                     for cache in (case["key_cache"], case["value_cache"]))

    keys, values = gathered()
    backends = [SDPBackend.MATH] if bench.smoke else [SDPBackend.EFFICIENT_ATTENTION]

    def sdpa_masked(k, v):
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(query, k, v, attn_mask=visible)

    flex = flex_attention_call(bench, query, keys[:, ::group].contiguous(),
                               values[:, ::group].contiguous(), context, case["tree_masks"], nodes)
    seconds = {"hta_triton": bench.seconds(hta),
               "sdpa_masked_with_gather": bench.seconds(lambda: sdpa_masked(*gathered())),
               "sdpa_masked_contiguous": bench.seconds(lambda: sdpa_masked(keys, values))}
    try:
        seconds["flex_attention_contiguous"] = bench.seconds(flex)
    except Exception as error:  # torch.compile can find no kernel for a shape
        results["baseline_failures"].append(dict(
            baseline="flex_attention_contiguous", dtype=str(dtype)[6:], context=context,
            nodes=nodes, error=f"{type(error).__name__}: {str(error)[:300]}"))
    if total <= 16384 or bench.smoke:
        from vllm_specextend.attention.hybrid_tree_attention import tree_attention_reference

        seconds["torch_reference"] = bench.seconds(lambda: tree_attention_reference(
            case["query"], case["key_cache"], case["value_cache"], case["block_table"],
            case["prefix_lens"], case["tree_start_loc"], case["tree_masks"], BLOCK_SIZE))
    kv_bytes = 2 * total * keys.shape[1] * keys.shape[3] * keys.element_size()
    timing = dict(kernel="hybrid_tree_attention", model=model, dtype=str(dtype)[6:],
                  context=context, batch=1, nodes=nodes, seconds=seconds,
                  bandwidth_bound_s=kv_bytes / results["copy_bandwidth"])
    results["timings"].append(timing)
    print(json.dumps(timing), flush=True)


def flex_attention_call(bench, query, keys, values, context, masks, nodes):
    """FlexAttention with a block mask: the prefix for every node, the tree
    under the ancestor masks; compiled on a GPU."""
    torch = bench.torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def visible(batch, head, q, k):
        in_tree = k - context
        bit = (masks[q] >> in_tree.clamp(min=0)) & 1
        return (k < context) | ((in_tree < nodes) & (bit == 1))

    block_mask = create_block_mask(visible, None, None, nodes, keys.shape[2],
                                   device=str(bench.device))
    attend = flex_attention if bench.smoke else torch.compile(flex_attention)
    return lambda: attend(query, keys, values, block_mask=block_mask, enable_gqa=True)


def draft_tree(bench: Bench, shapes: dict, results: dict) -> None:
    """The draft's tree attention over a working set of min(context, 2K),
    two trees of depth 8."""
    torch = bench.torch
    from vllm_specextend.attention.draft_tree_attention import (
        draft_tree_attention,
        draft_tree_attention_reference,
    )

    depth = 8
    cases = attention_cases(bench, shapes, batches=(2,))
    for model, (heads, kv_heads, head_dim), dtype, context, batch in cases:
        working = min(context, 2048)
        for nodes in shapes["trees"]:
            path_lens = torch.randint(1, depth + 1, (batch * nodes,), device=bench.device,
                                      generator=bench.generator)
            inputs = dict(
                query=bench.randn(batch * nodes, heads, head_dim, dtype=dtype),
                context_keys=bench.randn(batch, working, kv_heads, head_dim, dtype=dtype),
                context_values=bench.randn(batch, working, kv_heads, head_dim, dtype=dtype),
                context_lens=torch.full((batch,), working, device=bench.device),
                query_start_loc=torch.arange(batch + 1, device=bench.device) * nodes,
                path_keys=bench.randn(batch * nodes, depth, kv_heads, head_dim, dtype=dtype),
                path_values=bench.randn(batch * nodes, depth, kv_heads, head_dim, dtype=dtype),
                path_lens=path_lens)
            out, _ = draft_tree_attention(**inputs)
            expected, _ = draft_tree_attention_reference(**inputs)
            error = (out.float() - expected.float()).abs().max().item()
            results["correctness"].append(dict(
                kernel="draft_tree_attention", model=model, dtype=str(dtype)[6:], context=working,
                batch=batch, nodes=nodes, max_abs_error=error,
                passed=error <= TOLERANCE[str(dtype)[6:]]))


# Launch configurations timed against each launcher's own pick.
LAUNCH_ALTERNATIVES = {
    "_prefix_split_kernel": (dict(BLOCK_N=64, num_warps=4), dict(BLOCK_N=64, num_warps=8),
                             dict(BLOCK_N=32, num_warps=4), dict(BLOCK_N=32, num_warps=8),
                             dict(BLOCK_M=32, BLOCK_N=64, num_warps=4)),
    "_chunk_scores_kernel": (dict(num_warps=4), dict(num_warps=8)),
}


def launch_configs(bench: Bench, shapes: dict, results: dict) -> None:
    """Where a kernel's tiles are large (the prefix split at head_dim 128,
    the chunk pass at chunks of 256), the launcher's configuration against
    others: time, and the registers and spills the driver loaded each with."""
    torch = bench.torch
    from vllm_specextend.attention import hybrid_tree_attention
    from vllm_specextend.kernel_resources import kernel_launches
    from vllm_specextend.retrieval import chunk_scores

    model, (heads, kv_heads, head_dim) = next(iter(shapes["models"].items()))
    nodes, chunk = max(shapes["trees"]), 256
    for context in (min(shapes["contexts"]), max(shapes["contexts"])):
        case = tree_inputs(bench, nodes, 1, context, heads, kv_heads, head_dim,
                           torch.bfloat16, seed=0)
        common = (case["query"], case["key_cache"], case["value_cache"], case["block_table"],
                  case["prefix_lens"], case["tree_start_loc"])
        paged_keys, _, table = bench.paged(1, context, kv_heads, head_dim, torch.bfloat16)
        query = bench.randn(1, heads, head_dim, dtype=torch.bfloat16)
        lens = torch.tensor([context], dtype=torch.int32, device=bench.device)
        calls = {
            "_prefix_split_kernel": (hybrid_tree_attention, "prefix_split_launch", (head_dim,),
                                     lambda: hybrid_tree_attention.prefix_attention(
                                         *common, context, BLOCK_SIZE, head_dim ** -0.5)),
            "_chunk_scores_kernel": (chunk_scores, "chunk_pass_launch", (chunk, head_dim),
                                     lambda: chunk_scores.chunk_scores(
                                         query, paged_keys, table, lens, BLOCK_SIZE, chunk,
                                         max_len=context)),
        }
        for kernel, (module, name, launch_args, call) in calls.items():
            chosen = getattr(module, name)
            picked = chosen(*launch_args)
            for change in LAUNCH_ALTERNATIVES[kernel]:
                config = {**picked, **change}
                setattr(module, name, lambda *_, c=config: c)
                try:
                    with kernel_launches(launch=True) as launched:
                        call()
                    seconds = bench.seconds(call)
                finally:
                    setattr(module, name, chosen)
                # Interpreted kernels (--smoke) are not JIT functions: nothing is loaded.
                compiled = next((c for k, _, _, c in launched if k.fn.__name__ == kernel), None)
                row = dict(kernel=kernel, model=model, dtype="bfloat16", context=context,
                           nodes=nodes, chunk_size=chunk, config=config,
                           picked_by_launcher=config == picked, seconds=seconds,
                           registers=getattr(compiled, "n_regs", None),
                           spills=getattr(compiled, "n_spills", None))
                results["launch_configs"].append(row)
                print(json.dumps(row), flush=True)


def step_clock(bench: Bench, results: dict) -> None:
    """The speculation policy's clock (vllm_specextend.policy.step_clock):
    reading an interval never waits for the device, and once its end has
    happened it measures what the device did (a busy-wait of known length
    between the stamps)."""
    torch = bench.torch
    from vllm_specextend.policy.step_clock import StepClock

    clock = StepClock(bench.device)
    busy = torch.randn(2048, 2048, device=bench.device)
    start = clock.now()
    for _ in range(200 if bench.device.type == "cuda" else 2):
        busy = busy @ busy / 2048 ** 0.5
    end = clock.now()
    pending_right_after = not clock.done(end)
    began = time.perf_counter()
    if bench.device.type == "cuda":
        torch.cuda.synchronize()
    host_wait_s = time.perf_counter() - began
    measured = clock.seconds(start, end)
    results["correctness"].append(dict(
        kernel="policy step clock", device=str(bench.device), measured_s=measured,
        pending_right_after_the_work=pending_right_after, host_wait_s=host_wait_s,
        passed=clock.done(end) and measured > 0 and (
            bench.device.type != "cuda" or (pending_right_after and measured >= host_wait_s))))


def compass(bench: Bench, shapes: dict, results: dict) -> None:
    torch = bench.torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vllm_specextend.attention.rope import rotate_by
    from vllm_specextend.retrieval.chunk_scores import chunk_scores
    from vllm_specextend.retrieval.working_cache import (
        select_chunks,
        window_starts,
        working_cache_layout,
    )

    heads, kv_heads, head_dim = next(iter(shapes["models"].values()))
    dtype = torch.bfloat16
    contexts = shapes["contexts"] if bench.smoke else (16384, 131072)
    backends = [SDPBackend.MATH] if bench.smoke else [SDPBackend.FLASH_ATTENTION]
    weights_s = 2 * LLAMA_8B_PARAMETERS / (results["copy_bandwidth"] / 2)
    chunk, recent, top_k, capacity = 32, 256, 54, 2039  # a 2,048-position head's defaults
    cos_sin = torch.randn(max(contexts) + 1, head_dim, device=bench.device)
    rows = []
    for context in contexts:
        keys, values, table = bench.paged(1, context, kv_heads, head_dim, dtype)
        query = bench.randn(1, heads, head_dim, dtype=dtype)
        lens = torch.tensor([context], dtype=torch.int32, device=bench.device)
        head_keys = torch.zeros(capacity, kv_heads, head_dim, dtype=dtype, device=bench.device)

        def refresh():
            scores = chunk_scores(query, keys, table, lens, BLOCK_SIZE, chunk, max_len=context)
            start = window_starts(lens, chunk, recent)
            kept, num_kept = select_chunks(scores, start, chunk, top_k)
            layout = working_cache_layout(kept, num_kept, start, lens, chunk, capacity)
            # Filling a one-layer EAGLE head's working cache (keys and values).
            source = layout.source_positions[0]
            compact = torch.arange(capacity, device=bench.device)
            delta = torch.where(compact < layout.lengths[0], compact - source, 0)
            head_keys.copy_(rotate_by(bench.gathered(keys, table, 0, context)[source], delta,
                                      cos_sin))
            return values[0, 0]

        # SDPA's fused kernels want as many K/V heads as query heads.
        contiguous_k, contiguous_v = (
            bench.gathered(cache, table, 0, context).transpose(0, 1)[None]
            .repeat_interleave(heads // kv_heads, dim=1) for cache in (keys, values))

        def decode_attention():
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(query[:, :, None], contiguous_k,
                                                      contiguous_v)

        attention_s = bench.seconds(decode_attention)
        step_s = weights_s + 32 * attention_s
        refresh_s = bench.seconds(refresh)
        rows.append(dict(context=context, refresh_s=refresh_s, decode_attention_layer_s=attention_s,
                         target_step_estimate_s=step_s, refresh_share_of_step=refresh_s / step_s,
                         amortized_over_4_steps=refresh_s / (4 * step_s)))
    results["compass"]["cmr_refresh"] = dict(goal="at most 1% of a target decode step",
                                             weights_read_s=weights_s, rows=rows)
    hta_rows = [t for t in results["timings"] if t["kernel"] == "hybrid_tree_attention"
                and t["model"] == next(iter(shapes["models"])) and t["dtype"] == "bfloat16"
                and t["nodes"] == max(shapes["trees"])]
    if hta_rows:
        verify = min(hta_rows, key=lambda t: abs(t["context"] - (16384 if not bench.smoke
                                                                   else shapes["contexts"][-1])))
        decode = [r for r in rows if r["context"] == verify["context"]]
        single = decode[0]["decode_attention_layer_s"] if decode else float("nan")
        results["compass"]["hta_vs_decode"] = dict(
            goal="at most 1.1x", context=verify["context"], nodes=verify["nodes"],
            hta_s=verify["seconds"]["hta_triton"], single_token_decode_s=single,
            ratio=verify["seconds"]["hta_triton"] / single)


def machine_facts(bench: Bench) -> dict:
    torch = bench.torch
    import triton

    facts = {"torch": torch.__version__, "triton": triton.__version__}
    if bench.device.type == "cuda":
        facts["device"] = torch.cuda.get_device_name()
        try:
            facts["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            facts["driver"] = "unknown"
    else:
        facts["device"], facts["driver"] = "cpu (TRITON_INTERPRET=1 smoke run)", "none"
    return facts


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kernel in zip(axes, ("chunk_scores", "hybrid_tree_attention")):
        rows = [t for t in results["timings"] if t["kernel"] == kernel and t["batch"] == 1
                and t["dtype"] == "bfloat16" and t.get("nodes") in (None, max(
                    r.get("nodes") or 0 for r in results["timings"]))]
        model = rows[0]["model"] if rows else ""
        rows = [r for r in rows if r["model"] == model]
        for method in dict.fromkeys(m for r in rows for m in r["seconds"]):
            timed = [r for r in rows if method in r["seconds"]]
            ax.loglog([r["context"] for r in timed], [1e6 * r["seconds"][method] for r in timed],
                      marker="o", label=method, base=2)
        ax.loglog([r["context"] for r in rows], [1e6 * r["bandwidth_bound_s"] for r in rows],
                  linestyle="--", color="gray", label="bandwidth bound", base=2)
        ax.set(title=f"{kernel}, {model}, bf16, batch 1", xlabel="context (tokens)",
               ylabel="microseconds")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['device']} (torch {results['torch']}, Triton {results['triton']})",
                 fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def resources(out: Path) -> None:
    """Every kernel compiled for sm_90 and sm_80 without a GPU: JSON and a
    markdown table of registers, spills, stack and shared memory."""
    from dataclasses import asdict

    from vllm_specextend.kernel_resources import compile_all

    rows = compile_all()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    lines = ["| kernel | shape | dtype | target | warps | constants | registers | spills "
             "(B stored/loaded) | stack (B) | shared memory (B) | limit (B) | matrix |",
             "|" + "---|" * 12]
    for row in rows:
        constants = ", ".join(f"{k}={v}" for k, v in row.constants.items()
                              if k != "IN_FLOAT32")
        lines.append(f"| `{row.kernel}` | {row.case} | {row.dtype} | {row.target} | "
                     f"{row.num_warps} | {constants} | {row.registers} | {row.spill_stores}/"
                     f"{row.spill_loads} | {row.stack_frame} | {row.shared_memory:,} | "
                     f"{row.shared_memory_limit:,} | {row.matrix_instructions} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    bad = [row for row in rows if row.problems()]
    print(f"{len(rows)} launches compiled, {len(bad)} not fit to ship; "
          f"at most {max(r.registers for r in rows)} registers a thread")
    print(f"results: {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    if bad:
        raise SystemExit("\n".join(f"{r.kernel} [{r.case}, {r.dtype}, {r.target}]: "
                                    f"{'; '.join(r.problems())}" for r in bad))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--resources", action="store_true",
                        help="compile every kernel for sm_90 and sm_80 (no GPU needed) and "
                             "report registers, spills and shared memory")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS),
                        help="attention shapes to sweep (default: all)")
    parser.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--trees", nargs="+", type=int, default=list(TREES))
    parser.add_argument("--out", help="results path without suffix")
    args = parser.parse_args()
    if args.resources:
        resources(Path(args.out) if args.out else RESULTS / "kernel_resources")
        return
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    bench = Bench(args.smoke)
    shapes = SMOKE if args.smoke else dict(
        models={m: MODELS[m] for m in (args.models or MODELS)}, contexts=tuple(args.contexts),
        batches=tuple(args.batches), trees=tuple(args.trees))
    results = {**machine_facts(bench), "block_size": BLOCK_SIZE, "shapes": shapes,
               "copy_bandwidth": bench.copy_bandwidth(), "correctness": [], "timings": [],
               "launch_configs": [], "baseline_failures": [], "compass": {}}
    launch_configs(bench, shapes, results)
    chunk_scoring(bench, shapes, results)
    tree_attention(bench, shapes, results)
    draft_tree(bench, shapes, results)
    step_clock(bench, results)
    compass(bench, shapes, results)
    failed = [c for c in results["correctness"] if not c["passed"]]
    results["all_correct"] = not failed
    name = "smoke" if args.smoke else results["device"].lower().replace(" ", "_")
    out = Path(args.out) if args.out else RESULTS / f"gpu_kernels_{name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(json.dumps({"all_correct": not failed, "failed": failed[:5],
                      "compass": results["compass"]}, indent=1))
    print(f"results: {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    if failed:
        raise SystemExit(f"{len(failed)} correctness checks failed")


if __name__ == "__main__":
    main()
