"""Smoke runs of the benchmarks on the tiny pair (2 short samples, real
engines): the harness, the plot and the needle check keep working, and the
speculative methods stay lossless there too."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import without_triton_interpreter

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HAYSTACK = BENCHMARKS / "data/govreport/govreport_512.jsonl"


def run(script, *args):
    # The engine core in the script's own process: one process start (about
    # 9 s of imports) less per engine.
    subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)], check=True,
                   timeout=900, env={**without_triton_interpreter(os.environ),
                                     "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


def samples(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "sample"]


def test_long_input_paired_smoke_and_plot(tmp_path):
    """--paired: both engines loaded at once, each sample decoded by both in
    turn, twice; the second time from the cached prompt."""
    out = tmp_path / "long_input.jsonl"
    run("long_input.py", "--pair", "tiny", "--inputs", HAYSTACK, "--samples", 2, "--runs", 2,
        "--paired", "--max-new-tokens", 8, "--methods", "ar", "specextend",
        "--enforce-eager", "--out", out)
    records = samples(out)
    assert [(r["sample"], r["run"], r["method"]) for r in records] == [
        (0, 0, "ar"), (0, 0, "specextend"), (0, 1, "specextend"), (0, 1, "ar"),
        (1, 0, "ar"), (1, 0, "specextend"), (1, 1, "specextend"), (1, 1, "ar")]
    assert all(r["new_tokens"] == 8 for r in records)
    first, second = (max(r["prefill_s"] for r in records if r["run"] == run) for run in (0, 1))
    assert second < first  # the prompt was cached
    run("plot_long_input.py", out)
    assert out.with_suffix(".png").stat().st_size > 0
    report = out.with_suffix(".md").read_text()
    assert "| specextend | 4 |" in report  # 2 samples, 2 runs each
    assert report.count(" | 4/4 |") == 1  # outputs equal ar's
    assert "| govreport_512.jsonl | 1 | " in report.split("Paired:")[1]


def test_long_output_windows_smoke(tmp_path):
    """--window-tokens steps the engine and counts drafts and accepted
    tokens per window of output: together they are the sample's totals."""
    out = tmp_path / "long_output.jsonl"
    run("long_input.py", "--pair", "tiny", "--inputs",
        BENCHMARKS / "data/long_output/code_tasks.jsonl", "--samples", 1,
        "--max-new-tokens", 40, "--window-tokens", 16, "--methods", "ar", "specextend",
        "--enforce-eager", "--out", out)
    ar, specextend = sorted(samples(out), key=lambda r: r["method"])
    assert specextend["token_ids"] == ar["token_ids"]
    windows = specextend["output_windows"]
    assert len(windows) == 3
    assert all(w["output_tokens"] >= end for w, end in zip(windows, (16, 32, 40)))
    drafts, accepted = (sum(w[key] for w in windows) for key in ("drafts", "accepted"))
    assert drafts > 0 and 1 + accepted / drafts == specextend["mean_accepted_length"]
    run("plot_long_input.py", out)
    assert out.with_suffix(".windows.png").stat().st_size > 0
    assert "| specextend | " in out.with_suffix(".md").read_text().split(
        "by output position")[1]


def test_policy_simulation_smoke(tmp_path):
    out = tmp_path / "simulation.json"
    run("policy_simulation.py", "--steps", 30, "--rates", 0.2, 0.9, "--seeds", 1, "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert [(row["steps"], row["rate"]) for row in rows] == [(30, 0.2), (30, 0.9)]
    variants = [set(row) - {"steps", "rate", "stock_vs_ar"} for row in rows]
    assert all("default" in names and len(names) == 2 for names in variants)
    assert all(row[name] > 0 for row, names in zip(rows, variants) for name in names)
    assert out.with_suffix(".png").stat().st_size > 0


def test_needle_smoke(tmp_path):
    out = tmp_path / "needle"
    run("needle.py", "--pair", "tiny", "--haystack", HAYSTACK, "--samples", 2,
        "--max-new-tokens", 8, "--methods", "ar", "specextend[selection=recency]",
        "--enforce-eager", "--out", out)
    prompts = [json.loads(line) for line in (tmp_path / "needle.prompts.jsonl").open()]
    assert all(p["answer"] in p["text"] for p in prompts)
    assert len(samples(tmp_path / "needle.jsonl")) == 4
    report = (tmp_path / "needle.md").read_text()
    assert "| specextend[selection=recency] | 2 |" in report


def test_draft_attention_smoke(tmp_path):
    out = tmp_path / "draft_attention"
    run("draft_attention.py", "--contexts", 256, 2048, "--repeats", 1, "--out", out)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["context_len"] for r in rows] == [256, 2048]
    assert all(set(r["us"]) == {"vllm_full_context", "specextend", "previous_path"} for r in rows)
    assert all(t > 0 for r in rows for t in r["us"].values())
    assert out.with_suffix(".png").stat().st_size > 0


def test_verify_cost_smoke(tmp_path):
    out = tmp_path / "verify_cost"
    run("verify_cost.py", "--contexts", 256, 512, "--tokens", 1, 3, "--layers", 2,
        "--hidden", 256, "--mlp", 512, "--vocab", 1024, "--repeats", 1, "--out", out)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["tokens"] for r in rows] == [1, 3]
    assert all(set(r["attention_ms"]) == set(r["attention_one_token_rows_ms"]) == {"256", "512"}
               for r in rows)
    assert all(t > 0 for r in rows for t in [r["layer_matmuls_ms"], r["lm_head_ms"],
                                              *r["attention_ms"].values(),
                                              *r["attention_one_token_rows_ms"].values()])
    assert out.with_suffix(".png").stat().st_size > 0


def test_gpu_kernels_smoke(tmp_path):
    """The GPU evidence script at tiny shapes under TRITON_INTERPRET=1, with
    vLLM and pydantic unimportable, as on the lent GPU machines: every
    kernel checks against its reference and every timing path runs."""
    out = tmp_path / "gpu_kernels"
    blocked = ("import runpy, sys; sys.modules.update(vllm=None, pydantic=None); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    subprocess.run([sys.executable, "-c", blocked, str(BENCHMARKS / "gpu_kernels.py"),
                    "--smoke", "--out", str(out)], check=True, timeout=900,
                   env={**os.environ, "TRITON_INTERPRET": "1"})
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["all_correct"]
    kernels = {case["kernel"] for case in results["correctness"]}
    assert kernels == {"chunk_scores", "hybrid_tree_attention (prefix + tree part + merge)",
                       "draft_tree_attention", "policy step clock"}
    assert {"hta_vs_decode", "cmr_refresh"} <= set(results["compass"])
    configs = results["launch_configs"]
    assert {c["kernel"] for c in configs} == {"_prefix_split_kernel", "_chunk_scores_kernel"}
    # The launcher's own configuration is among those timed, once per kernel and context.
    picked = [(c["kernel"], c["context"]) for c in configs if c["picked_by_launcher"]]
    assert sorted(picked) == sorted(set((c["kernel"], c["context"]) for c in configs))
    assert out.with_suffix(".png").stat().st_size > 0


def test_profile_step_smoke(tmp_path):
    """Every part of a decode step is a non-negative share of the step."""
    out = tmp_path / "profile.json"
    run("profile_step.py", "--pair", "tiny", "--inputs", HAYSTACK, "--methods", "specextend",
        "--max-new-tokens", 8, "--out", out)
    [row] = json.loads(out.read_text())["rows"]
    assert row["decode_steps"] > 0 and row["new_tokens"] == 8
    parts = row["ms_per_step"]
    assert all(ms >= 0 for ms in parts.values()), parts
    assert parts["target forward"] > 0 and parts["draft forwards"] > 0
    # Steps aside ran no draft forward; every step is counted by its verified drafts.
    aside = row["aside"]
    assert 0 <= aside["steps"] <= row["decode_steps"]
    assert aside["ms_per_step"]["draft forwards"] == 0
    assert set(row["target_forward_ms_by_drafts_verified"]) <= {str(n) for n in range(5)}
    # The tiny draft's window covers the haystack: every draft was proposed.
    assert row["zero_filled_drafts_per_step"] == 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_head_training_smoke_and_resume(tmp_path):
    """The EAGLE-3 trainer on the tiny target: collects, trains, saves a head
    with its data, steps and loss curve; a resumed run continues from its
    checkpoint."""
    args = ("--pair", "tiny", "--windows", 2, "--window-len", 64, "--ttt-steps", 2,
            "--checkpoint-every", 1, "--out", tmp_path)
    run("train_eagle3_head.py", *args, "--epochs", 1)
    stamp = json.loads((tmp_path / "head/specextend_head.json").read_text())
    assert stamp["steps"] == 2 and len(stamp["losses"]) == 2 and stamp["tokens"] == 128
    assert stamp["windows_per_source"] == {"govreport+pg19 16K": 2}
    run("train_eagle3_head.py", *args, "--epochs", 2, "--resume")
    resumed = json.loads((tmp_path / "head/specextend_head.json").read_text())
    assert resumed["steps"] == 4 and resumed["losses"][:2] == stamp["losses"]
