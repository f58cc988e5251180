"""Every Triton kernel compiled for Hopper (sm_90) and Ampere (sm_80) on this
CPU machine, at the launch configurations its launcher picks: no compile
error, no spill, no stack frame, registers under the limit, shared memory
within the target's. Runs without TRITON_INTERPRET (nothing to compile
under it), in a subprocess."""

import json
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

from conftest import without_triton_interpreter

PACKAGE = Path(__file__).parent.parent / "vllm_specextend"


def run_python(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=600, env=without_triton_interpreter(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return proc.stdout


def project_kernels() -> set[str]:
    """Every `@triton.jit` function of the package named as a kernel (the
    others are helpers inlined into them)."""
    modules = [".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
               for path in PACKAGE.rglob("*.py") if "@triton.jit" in path.read_text()]
    return {name for module in modules for name, value in vars(import_module(module)).items()
            if name.endswith("_kernel") and hasattr(value, "fn")}


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    out = tmp_path_factory.mktemp("resources") / "resources.json"
    run_python("-m", "vllm_specextend.kernel_resources", "--json", str(out))
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_hopper_and_ampere_fit_to_ship(resources):
    from vllm_specextend.kernel_resources import REGISTER_LIMIT, SHARED_MEMORY_LIMIT

    assert {row["kernel"] for row in resources} == project_kernels()
    covered = {(row["kernel"], row["target"], row["dtype"]) for row in resources}
    assert covered == {(k, t, d) for k in project_kernels() for t in ("sm_90", "sm_80")
                       for d in ("float16", "bfloat16")}
    for row in resources:
        where = f"{row['kernel']} [{row['case']}, {row['dtype']}, {row['target']}]"
        assert row["spill_stores"] == row["spill_loads"] == 0, where
        assert row["stack_frame"] == 0, where
        assert 0 < row["registers"] <= REGISTER_LIMIT, where
        assert row["shared_memory"] <= SHARED_MEMORY_LIMIT[int(row["target"][3:])], where


def test_shapes_cover_head_dims_kv_heads_and_chunk_sizes(resources):
    cases = {row["case"] for row in resources}
    head_dims = {row["constants"].get("HEAD_DIM", row["constants"].get("HEAD_TILE"))
                 for row in resources}
    assert {64, 128} <= head_dims
    # One KV head (a tensor-parallel rank) is specialised to a constant.
    assert any(row["constants"].get("num_kv_heads") == 1 for row in resources)
    assert {row["constants"]["CHUNK_TILE"] for row in resources
            if row["kernel"] == "_chunk_scores_kernel"} == {32, 256}
    assert any("/tp" in case for case in cases)


def test_hopper_prefix_split_uses_wgmma(resources):
    """The tile products run on Hopper's warp-group matrix instructions."""
    rows = [r for r in resources if r["kernel"] == "_prefix_split_kernel"]
    assert {r["matrix_instructions"] for r in rows if r["target"] == "sm_90"} == {"wgmma"}
    assert {r["matrix_instructions"] for r in rows if r["target"] == "sm_80"} == {"mma"}


def test_the_check_catches_a_kernel_at_the_register_ceiling():
    """The prefix split's former tiles at head_dim 128 (key tiles of 64, 4
    warps) compile to 255 registers on sm_80: the check must refuse them."""
    problems = json.loads(run_python(
        "-c", "import json, torch\n"
        "from vllm_specextend.attention import hybrid_tree_attention\n"
        "from vllm_specextend import kernel_resources\n"
        "hybrid_tree_attention.prefix_split_launch = lambda head_dim: dict(\n"
        "    BLOCK_M=64, BLOCK_N=64, num_warps=4)\n"
        "calls = [c for c in kernel_resources.cases()\n"
        "         if c[0] == 'llama-3.1-8b, 64-node tree' and c[1] == torch.bfloat16]\n"
        "rows = kernel_resources.compile_all(archs=(80,), launcher_calls=calls)\n"
        "print(json.dumps({r.kernel: r.problems() for r in rows}))\n"))
    assert problems["_tree_part_kernel"] == []
    [found] = problems["_prefix_split_kernel"]
    assert "registers a thread" in found
