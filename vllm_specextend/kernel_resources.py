"""Every Triton kernel of the plugin compiled ahead of time for Hopper and
Ampere, on a machine without a GPU, with its resources read back.

The launches are the launchers' own: each public launcher runs on small CPU
tensors of a realistic attention shape while `JITFunction.run` only records
what it was called with, so a changed tile size or warp count is what gets
compiled. Triton's own binder specialises the arguments (an int equal to 1
becomes a constant, 16-divisible pointers and ints are marked), Triton
compiles for the named target, and the bundled ptxas, run as Triton runs
it, reports registers, spills and the stack frame.

    python -m vllm_specextend.kernel_resources [--json PATH]

Import this module without TRITON_INTERPRET=1: under the interpreter there
is nothing to compile.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import import_module

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

# Opt-in shared memory per block (bytes).
SHARED_MEMORY_LIMIT = {90: 232_448, 80: 166_912}
# Registers a thread may use: the hardware's ceiling is 255; a kernel within
# an eighth of it spills on the next tile change or compiler release.
REGISTER_LIMIT = 224
ARCHS = (90, 80)
DTYPES = (torch.float16, torch.bfloat16)
# (query heads, KV heads, head_dim): Llama-3.1-8B, one tensor-parallel rank
# of it at TP=8 (one KV head), Qwen2.5-1.5B, and head_dim 64 (Qwen2.5-0.5B,
# the draft; one KV head for a rank of it).
ATTENTION_SHAPES = {
    "llama-3.1-8b": (32, 8, 128),
    "llama-3.1-8b/tp8": (4, 1, 128),
    "qwen2.5-1.5b": (12, 2, 128),
    "qwen2.5-0.5b": (14, 2, 64),
    "qwen2.5-0.5b/tp2": (7, 1, 64),
}
CHUNK_SIZES = (32, 256)  # the default and a large one
BLOCK_SIZE = 16  # FlashAttention's paged KV block
CONTEXT = 16_384
TREE_NODES = 64
TREE_DEPTH = 10
DRAFT_WINDOW = 2_048


@dataclass(frozen=True)
class Launch:
    """One kernel launch as Triton's JIT would compile it for one target."""

    module: str
    kernel: str
    case: str
    dtype: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def key(self) -> str:
        """Identical compilations (several cases can share one) compile once."""
        return json.dumps([self.module, self.kernel, self.arch, self.signature,
                           sorted(map(str, self.constexprs.items())),
                           sorted(map(str, self.attrs.items())), self.options], sort_keys=True)


@dataclass
class Resources:
    kernel: str
    case: str
    dtype: str
    target: str
    num_warps: int
    num_stages: int
    constants: dict  # tiles, and ints Triton specialised (equal to 1)
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_memory: int
    shared_memory_limit: int
    matrix_instructions: str

    def problems(self) -> list[str]:
        """Why this compilation would not be fit to ship (empty when it is)."""
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills {self.spill_stores} B stored, {self.spill_loads} B loaded")
        if self.stack_frame:
            found.append(f"stack frame of {self.stack_frame} B")
        if self.registers > REGISTER_LIMIT:
            found.append(f"{self.registers} registers a thread, over {REGISTER_LIMIT} (the "
                         "ceiling is 255)")
        if self.shared_memory > self.shared_memory_limit:
            found.append(f"{self.shared_memory} B of shared memory, over the "
                         f"{self.shared_memory_limit} B a block may have")
        return found


@contextmanager
def kernel_launches(launch: bool):
    """Within it, every Triton kernel launch is recorded as (kernel, args,
    kwargs, compiled kernel): launched as usual when `launch`, else not at
    all (compiled None)."""
    launches = []
    run = JITFunction.run

    def record(kernel, *args, grid, warmup, **kwargs):
        compiled = run(kernel, *args, grid=grid, warmup=warmup, **kwargs) if launch else None
        launches.append((kernel, args, kwargs, compiled))
        return compiled

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


def _paged_cache(kv_heads: int, head_dim: int, dtype, flat: bool):
    """A paged K cache [blocks, BLOCK_SIZE, kv_heads, head_dim] (or its slots
    flattened) with a block table for CONTEXT + TREE_NODES tokens."""
    blocks = triton.cdiv(CONTEXT + TREE_NODES, BLOCK_SIZE)
    cache = torch.empty(blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    return (cache.flatten(0, 1) if flat else cache), table


def _launch_chunk_scores(heads, kv_heads, head_dim, dtype, chunk_size):
    from vllm_specextend.retrieval.chunk_scores import chunk_scores

    keys, table = _paged_cache(kv_heads, head_dim, dtype, flat=False)
    query = torch.empty(1, heads, head_dim, dtype=dtype)
    lens = torch.tensor([CONTEXT], dtype=torch.int32)
    chunk_scores(query, keys, table, lens, BLOCK_SIZE, chunk_size, max_len=CONTEXT)


def _launch_hybrid_tree_attention(heads, kv_heads, head_dim, dtype):
    from vllm_specextend.attention.hybrid_tree_attention import hybrid_tree_attention

    keys, table = _paged_cache(kv_heads, head_dim, dtype, flat=True)
    query = torch.empty(TREE_NODES, heads, head_dim, dtype=dtype)
    hybrid_tree_attention(
        query, keys, torch.empty_like(keys), table, torch.tensor([CONTEXT], dtype=torch.int32),
        torch.tensor([0, TREE_NODES], dtype=torch.int32),
        torch.zeros(TREE_NODES, dtype=torch.int64), BLOCK_SIZE, max_prefix_len=CONTEXT)


def _launch_draft_tree_attention(heads, kv_heads, head_dim, dtype):
    from vllm_specextend.attention.draft_tree_attention import draft_tree_attention

    context = torch.empty(1, DRAFT_WINDOW, kv_heads, head_dim, dtype=dtype)
    path = torch.empty(TREE_NODES, TREE_DEPTH, kv_heads, head_dim, dtype=dtype)
    draft_tree_attention(
        torch.empty(TREE_NODES, heads, head_dim, dtype=dtype), context, torch.empty_like(context),
        torch.tensor([DRAFT_WINDOW], dtype=torch.int32),
        torch.tensor([0, TREE_NODES], dtype=torch.int32), path, torch.empty_like(path),
        torch.ones(TREE_NODES, dtype=torch.int32))


def cases():
    """(case name, dtype, launcher call) for every launcher at every shape."""
    for dtype in DTYPES:
        for name, shape in ATTENTION_SHAPES.items():
            for chunk_size in CHUNK_SIZES:
                yield f"{name}, chunk {chunk_size}", dtype, (
                    lambda s=shape, c=chunk_size, d=dtype: _launch_chunk_scores(*s, d, c))
            yield f"{name}, {TREE_NODES}-node tree", dtype, (
                lambda s=shape, d=dtype: _launch_hybrid_tree_attention(*s, d))
            yield f"{name}, {TREE_NODES}-node draft tree", dtype, (
                lambda s=shape, d=dtype: _launch_draft_tree_attention(*s, d))


def planned_launches(archs=ARCHS, launcher_calls=None) -> list[Launch]:
    """Every launch of every case (default: all of `cases()`), specialised by
    Triton's own binder for each target."""
    planned = []
    for case, dtype, call in launcher_calls or cases():
        with kernel_launches(launch=False) as launches:
            call()
        for kernel, args, kwargs, _ in launches:
            for arch in archs:
                backend = make_backend(GPUTarget("cuda", arch, 32))
                binder = create_function_from_signature(kernel.signature, kernel.params, backend)
                bound, specialization, options = binder(*args, **kwargs)
                options, signature, constexprs, attrs = kernel._pack_args(
                    backend, kwargs, bound, specialization, options)
                planned.append(Launch(
                    kernel.module, kernel.fn.__name__, case, str(dtype)[6:], arch, signature,
                    constexprs, attrs, options.__dict__))
    return planned


def _ptxas_report(ptx: str, arch: int, options: dict) -> dict:
    """Registers, spills and stack frame from the bundled ptxas, given the
    flags Triton's own cubin step gives it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        fmad = [] if options["enable_fp_fusion"] else ["--fmad=false"]
        report = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", source.name, "-o", "/dev/null"],
            capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        if found is None:
            raise RuntimeError(f"ptxas said nothing matching {pattern!r}:\n{report}")
        return int(found.group(1))

    return dict(registers=number(r"Used (\d+) registers"),
                spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"),
                stack_frame=number(r"(\d+) bytes stack frame"))


def compile_launch(launch: Launch) -> Resources:
    kernel = getattr(import_module(launch.module), launch.kernel)
    target = GPUTarget("cuda", launch.arch, 32)
    compiled = triton.compile(ASTSource(kernel, launch.signature, launch.constexprs, launch.attrs),
                              target=target, options=launch.options)
    ptx = compiled.asm["ptx"]
    names = kernel.arg_names
    return Resources(
        kernel=launch.kernel, case=launch.case, dtype=launch.dtype, target=f"sm_{launch.arch}",
        num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
        constants={names[path[0]]: value for path, value in launch.constexprs.items()},
        **_ptxas_report(ptx, launch.arch, launch.options),
        shared_memory=compiled.metadata.shared,
        shared_memory_limit=SHARED_MEMORY_LIMIT[launch.arch],
        matrix_instructions=("wgmma" if "wgmma." in ptx else "mma" if "mma.sync" in ptx
                             else "none"))


def compile_all(archs=ARCHS, launcher_calls=None, workers: int = 2) -> list[Resources]:
    """Every distinct launch compiled once, its resources reported for every
    case that launches it."""
    planned = planned_launches(archs, launcher_calls)
    distinct = list({launch.key(): launch for launch in planned}.values())
    with ProcessPoolExecutor(workers) as pool:
        compiled = dict(zip((launch.key() for launch in distinct),
                            pool.map(compile_launch, distinct)))
    return [Resources(**{**asdict(compiled[launch.key()]), "case": launch.case})
            for launch in planned]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write every compilation's resources here")
    args = parser.parse_args()
    rows = compile_all()
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(row) for row in rows], out, indent=1)
    bad = [(row, row.problems()) for row in rows if row.problems()]
    for row, problems in bad:
        print(f"{row.kernel} [{row.case}, {row.dtype}, {row.target}]: {'; '.join(problems)}")
    print(f"{len(rows)} launches compiled, {len(bad)} not fit to ship")


if __name__ == "__main__":
    main()
