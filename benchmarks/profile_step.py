"""Where one decoding step's time goes, on one long request: the scheduler,
the target's forward (verification), the sampler, the drafting round (each
draft forward, the CMR refresh, the plugin's glue around them) and the
rest of the engine step.

    python benchmarks/profile_step.py --pair qwen-coder \
        --inputs benchmarks/data/govreport/govreport_4K.jsonl \
        --methods draft_model specextend "specextend[draft_window=2048]" \
        --out benchmarks/results/profile_step_qwen_cpu.json

Each method runs in its own process, with vLLM in that one process (no
engine-core or worker subprocesses), so the timers wrap vLLM's own
functions directly: `Scheduler.schedule`, `GPUModelRunner._model_forward`
(the target), `GPUModelRunner._sample`, the proposer's `propose` (the whole
drafting round) and its draft model's forward calls, and the plugin's
refresh (`SpecExtendDrafting._refresh`; `CrossModelRetrieval.refresh` in
the code before the working cache). "plugin glue" is the drafting round
less its draft forwards and refreshes. Times are kept per engine step and
averaged over the decode steps: the prompt runs alone first (max_tokens=1,
also the warm-up) to count its prefill steps, and the decoding run's steps
after that many are its decode steps. The decode steps that verified no
drafts and ran no draft forward (rounds where every request stepped aside,
with the speculation policy) are averaged apart too ("aside"): beside
target-only's steps they show what speculation costs a step that does not
speculate. Where a request's context does not fit the drafter's length
(stock `eagle3` past its head's positions), vLLM's runner does not call
the proposer; it schedules drafts of token 0 for the target to verify
(`zero_filled_drafts_per_step`). PYTHONPATH can point at another checkout
of the plugin to profile it the same way ("before").
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from long_input import load_samples, speculative_config
from machine import machine

DRAFT_COUNTS = ("drafts verified", "drafts zero-filled")  # kept per step beside the seconds
PARTS = ("scheduler", "target forward", "sampler", "draft forwards", "refresh",
         "plugin glue", "other")


class StepTimes:
    """Seconds per part, kept per engine step (vLLM runs in this process, so
    every timed part runs inside `LLMEngine.step`)."""

    def __init__(self):
        self.steps: list[collections.Counter] = []

    def count_drafts(self, scheduler_class) -> None:
        """Each step's scheduled drafts (what its target forward verifies), and
        how many of them are placeholders."""
        original = scheduler_class.schedule

        @functools.wraps(original)
        def schedule(*args, **kwargs):
            output = original(*args, **kwargs)
            if self.steps:
                drafts = output.scheduled_spec_decode_tokens.values()
                self.steps[-1]["drafts verified"] = sum(len(ids) for ids in drafts)
                # vLLM's runner fills a request's drafts with token 0 when
                # its context does not fit the drafter's length: verified,
                # never proposed.
                self.steps[-1]["drafts zero-filled"] = sum(
                    len(ids) for ids in drafts if ids and not any(ids))
            return output

        scheduler_class.schedule = schedule

    def time(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)
        starts_a_step = part == "step"

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if starts_a_step:
                self.steps.append(collections.Counter())
            step = self.steps[-1] if self.steps else collections.Counter()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                step[part] += time.perf_counter() - start

        setattr(owner, name, wrapper)


def profile(job: dict) -> dict:
    """Runs in a fresh process: one engine, one request, per-part seconds."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job["kv_cache_gib"]))
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "7200")
    from vllm import LLM, SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    times = StepTimes()
    times.count_drafts(Scheduler)
    times.time(Scheduler, "schedule", "scheduler")
    times.time(GPUModelRunner, "_model_forward", "target forward")
    times.time(GPUModelRunner, "_sample", "sampler")
    times.time(LLMEngine, "step", "step")
    from vllm_specextend.vllm_glue.proposer import SpecExtendProposer
    times.time(SpecExtendProposer, "_refresh", "refresh")
    load_model = SpecDecodeBaseProposer.load_model

    def load_and_time(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        times.time(self.model, "forward", "draft forwards")
        # The runner's whole call: SpecExtend's round or vLLM's own.
        times.time(self, "propose", "drafting round")

    SpecDecodeBaseProposer.load_model = load_and_time
    llm = LLM(model=job["target"], speculative_config=job["speculative_config"],
              max_model_len=job["max_model_len"], dtype=job["dtype"],
              gpu_memory_utilization=0.1, enable_prefix_caching=False, enforce_eager=True,
              seed=0, max_num_seqs=4, distributed_executor_backend="uni")
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": job["text"]}],
                                         tokenize=False, add_generation_prompt=True)
    # The prompt alone first (a warm-up, and how many steps its prefill takes);
    # then the same request decoding: its steps after that many are decode steps.
    llm.generate([text], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    prefill_steps = len(times.steps)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], ignore_eos=True)
    [output] = llm.generate([text], params, use_tqdm=False)
    decode_steps = times.steps[2 * prefill_steps:]  # past the warm-up and its own prefill
    aside = [step for step in decode_steps
             if not step["drafts verified"] and not step["draft forwards"]]
    return {"prompt_tokens": len(output.prompt_token_ids), "prefill_steps": prefill_steps,
            "decode_steps": len(decode_steps), **mean_step(decode_steps),
            "aside": {"steps": len(aside), **mean_step(aside)},
            "target_forward_ms_by_drafts_verified": forward_by_drafts(decode_steps),
            "zero_filled_drafts_per_step": sum(step["drafts zero-filled"] for step in decode_steps)
            / max(len(decode_steps), 1),
            "new_tokens": len(output.outputs[0].token_ids)}


def forward_by_drafts(steps: list[collections.Counter]) -> dict:
    """The target forward's mean milliseconds by the drafts its step verified."""
    by_drafts = collections.defaultdict(list)
    for step in steps:
        by_drafts[step["drafts verified"]].append(step["target forward"])
    return {str(drafts): 1e3 * sum(times) / len(times)
            for drafts, times in sorted(by_drafts.items())}


def mean_step(steps: list[collections.Counter]) -> dict:
    """Milliseconds per step, by part, over `steps` (none: zeros)."""
    total = sum(steps, collections.Counter())
    for count in DRAFT_COUNTS:
        total.pop(count, None)
    per_step = {part: 1e3 * seconds / max(len(steps), 1) for part, seconds in total.items()}
    drafting = per_step.pop("drafting round", 0.0)
    per_step["plugin glue"] = drafting - per_step.get("draft forwards", 0.0) - per_step.get(
        "refresh", 0.0)
    step = per_step.pop("step", 0.0)
    per_step["other"] = step - sum(per_step.values())
    return {"step_ms": step, "ms_per_step": {part: per_step.get(part, 0.0) for part in PARTS}}


def plot(rows: list[dict], path: Path) -> None:
    """One stacked bar per profiled row: where a decode step's time goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['input'].removesuffix('.jsonl')} {r['method']}"
             + (f" ({r['label']})" if r["label"] else "") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(rows)))
    left = [0.0] * len(rows)
    for index, part in enumerate(PARTS):
        widths = [r["ms_per_step"][part] for r in rows]
        ax.barh(names, widths, left=left, label=part, color=f"C{index}")
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step")
    ax.legend(fontsize=7, ncols=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=["tiny", "qwen-coder"], default="tiny")
    parser.add_argument("--draft", help="the draft (or EAGLE head) to use with --pair's target")
    parser.add_argument("--inputs", nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["draft_model", "specextend"])
    parser.add_argument("--label", default="", help="e.g. 'before': kept with each row")
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        print("PROFILE " + json.dumps(profile(job)), flush=True)
        return
    if args.pair == "tiny":
        from vllm_specextend.models.tiny import build_tiny_pair

        pair = build_tiny_pair()
    else:
        from vllm_specextend.models.qwen_coder import prepare_pair

        pair = prepare_pair()
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for path in args.inputs:
        [text] = load_samples(path, 1)
        for method in args.methods:
            job = {"target": pair.target, "text": text, "dtype": args.dtype,
                   "speculative_config": speculative_config(method, args.draft or pair.draft,
                                                            args.num_speculative_tokens),
                   "max_model_len": args.max_model_len, "kv_cache_gib": args.kv_cache_gib,
                   "max_new_tokens": args.max_new_tokens}
            job_path = out.with_suffix(".job.json")
            job_path.write_text(json.dumps(job))
            run = subprocess.run([sys.executable, __file__, "--inputs", "-", "--out", str(out),
                                  "--worker", str(job_path)], capture_output=True, text=True)
            job_path.unlink()
            lines = [line for line in run.stdout.splitlines() if line.startswith("PROFILE ")]
            if run.returncode != 0 or not lines:
                raise SystemExit(f"{method} failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
            row = {"input": Path(path).name, "method": method, "label": args.label,
                   **json.loads(lines[0][len("PROFILE "):])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "dtype": args.dtype,
                               "cpu_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                                  "auto"),
                               "ld_preload": os.environ.get("LD_PRELOAD", ""),
                               "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
