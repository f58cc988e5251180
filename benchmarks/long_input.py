"""Long-input benchmark: decode speed and mean accepted length against input
length, per method, side by side (in the spirit of `vllm bench`).

    python benchmarks/long_input.py --pair qwen-coder \
        --inputs benchmarks/data/govreport/govreport_{1K,2K,4K}.jsonl \
        --samples 3 --max-new-tokens 64 \
        --methods ar draft_model specextend "specextend[retrieval=false]" \
        --out benchmarks/results/long_input_cpu.json [--resume]

Methods run one after another, each in a fresh engine process (with
--interleave, one engine per method and sample, the methods taking turns on
each sample, so that a slow spell of the machine falls on all of them; with
--paired, one engine per method for the whole sweep, all loaded at once,
prefix caching on, and each sample decoded --runs times by every method in
turn, the order rotating: run 0 pays the prefill, later runs decode from
the cached prompt, seconds apart, so ratios between methods are paired;
every engine must fit in memory beside the others):
  ar                    target only
  draft_model           stock vLLM speculation, same draft and k
  eagle3                stock vLLM EAGLE-3 speculation (--draft: the head)
  specextend            the full method
  specextend[k=v,...]   an ablation: any SpecExtend setting, e.g.
                        retrieval=false, top_k_chunks=16, refresh_every=8;
                        tree=true drafts trees of tree_nodes nodes (-k unused)
  METHOD#LABEL          another engine of METHOD (with --paired, `ar ar#2`
                        measures what two identical engines differ by)
With --window-tokens N (long outputs: prompts whose answers run long, e.g.
benchmarks/data/long_output/code_tasks.jsonl, and --max-new-tokens 4096)
each sample also records vLLM's drafts and accepted tokens per N tokens of
output, for acceptance against output position (plot_long_input.py:
NAME.windows.png).
Every finished sample is appended to the results file at once (an
interrupted run keeps what it measured; --resume skips what is there).
Greedy outputs are compared with `ar` on the same sample; a mismatch is a
bug and is printed loudly. Plot and table: benchmarks/plot_long_input.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import machine

REPO = Path(__file__).resolve().parent.parent
READY = '{"kind": "ready"}'  # a serving worker's engine has loaded


def parse_method(method: str) -> tuple[str, dict]:
    """'specextend[retrieval=false,top_k_chunks=16]' -> ('specextend', {...});
    'ar#2' -> ('ar', {}): a second engine of a method, under its own name
    (an A/A run: what two identical engines differ by)."""
    name, _, rest = method.split("#")[0].partition("[")
    settings = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, value = item.partition("=")
        settings[key.strip()] = _setting_value(value.strip())
    if name not in ("ar", "draft_model", "eagle3", "specextend") or (
            settings and name != "specextend"):
        raise SystemExit(f"unknown method {method!r}")
    return name, settings


def _setting_value(text: str):
    """JSON where it parses (numbers, true/false), else the bare string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def speculative_config(method: str, draft: str, k: int) -> dict | None:
    name, settings = parse_method(method)
    if name == "ar":
        return None
    # Tree mode: the draft tokens per step are the tree's nodes.
    drafts = {} if settings.get("tree") else {"num_speculative_tokens": k}
    return {"method": name, "model": draft, **drafts, **settings}


def load_samples(path: str, count: int) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f][:count]


def sample_key(method: str, item: dict) -> tuple:
    """What identifies one measured sample in a results file."""
    return method, item["input"], item["sample"], item["run"]


def done_keys(out: Path) -> set[tuple]:
    if not out.exists():
        return set()
    return {sample_key(r["method"], r)
            for r in map(json.loads, out.read_text().splitlines()) if r.get("kind") == "sample"}


def plan_engines(methods: list[str], items: list[dict], done: set[tuple],
                 interleave: bool) -> list[tuple[str, list[dict]]]:
    """(method, items) per engine, in run order, without what is done: one
    engine per method, or with `interleave` one per method and item, the
    methods in turn on each item."""
    if interleave:
        engines = [(method, [item]) for item in items for method in methods]
    else:
        engines = [(method, items) for method in methods]
    return [(method, [item for item in batch if sample_key(method, item) not in done])
            for method, batch in engines]


def run_method(job: dict) -> None:
    """Worker process: one engine, every (input, sample, run) of one method:
    the job's items, or (`serve`) items read from stdin one JSON line at a
    time, each answered by its record on stdout, after a line saying the
    engine is ready."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job["kv_cache_gib"]))
    # One CPU prefill step of a 4K prompt outlasts vLLM's 300 s RPC timeout.
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "7200")
    from vllm import LLM, SamplingParams

    from vllm_specextend.metrics import (
        acceptance_rate,
        mean_accepted_length,
        spec_decode_counters,
    )

    llm = LLM(model=job["target"], speculative_config=job["speculative_config"],
              max_model_len=job["max_model_len"], dtype=job["dtype"],
              gpu_memory_utilization=0.1, disable_log_stats=False,
              enable_prefix_caching=job["serve"], enforce_eager=job["enforce_eager"], seed=0,
              max_num_seqs=job["max_num_seqs"])
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], ignore_eos=True)
    out = Path(job["out"])
    items = job["items"]
    if job["serve"]:
        print(READY, flush=True)
        items = map(json.loads, sys.stdin)
    for item in items:
        text = item["text"]
        if job["chat_template"]:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
        before, policy_before = spec_decode_counters(llm), policy_counters(llm)
        if job["window_tokens"]:
            output, windows = generate_by_windows(llm, text, params, job["window_tokens"])
        else:
            [output], windows = llm.generate([text], params, use_tqdm=False), None
        after, policy_after = spec_decode_counters(llm), policy_counters(llm)
        stats = output.metrics
        prefill_s = stats.first_token_ts - stats.scheduled_ts
        decode_s = stats.last_token_ts - stats.first_token_ts
        generated = list(output.outputs[0].token_ids)
        delta = {name: after[name] - before[name] for name in after}
        record = {
            "kind": "sample", "method": job["method"], "input": item["input"],
            "sample": item["sample"], "run": item["run"],
            "prompt_tokens": len(output.prompt_token_ids), "new_tokens": len(generated),
            "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tokens_per_s": (len(generated) - 1) / decode_s if decode_s > 0 else None,
            "mean_accepted_length": mean_accepted_length(delta),
            "acceptance_rate": acceptance_rate(delta),
            "policy": policy_summary(policy_before, policy_after),
            "output_windows": windows,
            "token_ids": generated,
        }
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "token_ids"}), flush=True)


def generate_by_windows(llm, prompt: str, params, window_tokens: int) -> tuple:
    """One request stepped through the engine, with vLLM's spec-decode
    counters read each time its output passes a multiple of `window_tokens`:
    its final output and, per window, the output tokens at its end, the
    drafting steps and the accepted drafts in it."""
    from vllm_specextend.metrics import spec_decode_counters

    engine = llm.llm_engine
    engine.add_request("long_output", prompt, params)
    marks, output = [{**spec_decode_counters(llm), "output_tokens": 0}], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            pass
        produced = len(output.outputs[0].token_ids) if output is not None else 0
        if produced >= len(marks) * window_tokens or not engine.has_unfinished_requests():
            marks.append({**spec_decode_counters(llm), "output_tokens": produced})
    drafts, accepted = "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens"
    return output, [{"output_tokens": end["output_tokens"], "drafts": end[drafts] - start[drafts],
                     "accepted": end[accepted] - start[accepted]}
                    for start, end in zip(marks, marks[1:])]


def policy_counters(llm) -> dict:
    """The speculation policy's counters in the (first) worker, or {}."""
    if llm.llm_engine.vllm_config.speculative_config is None:
        return {}
    [state] = llm.collective_rpc("specextend_state")
    return {name: value for name, value in state.items() if name.startswith("policy_")}


def policy_summary(before: dict, after: dict) -> dict | None:
    """What the per-request policy picked over one sample: decoding rounds,
    the share of them a request sat out, the mean draft length, rounds by
    draft length, probes, rounds that skipped the draft, the tokens it read
    late and the rounds that read them first (catch-ups), and the rounds
    over each context where a request had the choice."""
    if "policy_rounds" not in after:
        return None
    delta = {name: after[name] - before.get(name, 0) for name in (
        "policy_rounds", "policy_requests_drafting", "policy_requests_stepped_aside",
        "policy_probes", "policy_cost_rechecks", "policy_drafts_picked",
        "policy_rounds_skipped",
        "policy_tokens_caught_up", "policy_catch_ups",
        "policy_context_rounds_whole_context",
        "policy_context_rounds_working_cache", "policy_context_trials",
        "policy_context_kept_working_cache")}
    decided = delta["policy_requests_drafting"] + delta["policy_requests_stepped_aside"]
    by_length = after["policy_picks_by_length"]
    previous = before.get("policy_picks_by_length") or [0] * len(by_length)
    return {"rounds": delta["policy_rounds"],
            "stepped_aside_fraction": (delta["policy_requests_stepped_aside"] / decided
                                       if decided else None),
            "mean_pick": delta["policy_drafts_picked"] / decided if decided else None,
            "picks_by_length": [a - b for a, b in zip(by_length, previous)],
            "probes": delta["policy_probes"], "cost_rechecks": delta["policy_cost_rechecks"],
            "rounds_skipped": delta["policy_rounds_skipped"],
            "tokens_caught_up": delta["policy_tokens_caught_up"],
            "catch_ups": delta["policy_catch_ups"],
            "context_rounds": {"whole_context": delta["policy_context_rounds_whole_context"],
                               "working_cache": delta["policy_context_rounds_working_cache"]},
            "context_trials": delta["policy_context_trials"],
            "context_kept_working_cache": delta["policy_context_kept_working_cache"],
            "costs_s": after["policy_costs_s"]}


class Worker:
    """One engine's process (`run_method`), its records read off its stdout
    and its engine's log passed to stderr."""

    def __init__(self, job: dict, job_path: Path):
        self.method, self.job_path = job["method"], job_path
        job_path.write_text(json.dumps(job))
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--inputs", "-", "--worker", str(job_path)],
            stdin=subprocess.PIPE if job["serve"] else None, stdout=subprocess.PIPE, text=True)

    def next_record(self, progress) -> dict | None:
        """The next sample's record (None at the end), or the ready line."""
        for line in self.process.stdout:
            if line.startswith(READY):
                return {"kind": "ready"}
            if line.startswith('{"kind": "sample"'):
                progress.update(1)
                progress.set_postfix_str(self.method)
                return json.loads(line)
            progress.write(line.rstrip(), file=sys.stderr)
        return None

    def ask(self, item: dict, progress) -> dict:
        self.process.stdin.write(json.dumps(item) + "\n")
        self.process.stdin.flush()
        record = self.next_record(progress)
        if record is None:
            raise SystemExit(f"method {self.method} failed (exit {self.process.wait()})")
        return record

    def close(self, progress) -> None:
        """Wait for the worker's end, passing on its last log lines."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        while self.next_record(progress) is not None:
            pass
        if self.process.wait() != 0:
            raise SystemExit(f"method {self.method} failed (exit {self.process.returncode})")
        self.job_path.unlink()


def run_paired(methods: list[str], items: list[dict], done: set[tuple], job_for, out: Path,
               progress) -> None:
    """Every method's engine loaded at once (one after another); each item
    then decoded by every method in turn, the order rotating with the run."""
    workers = []
    for index, method in enumerate(methods):
        workers.append(Worker(job_for(method, []), out.with_suffix(f".job{index}.json")))
        if workers[-1].next_record(progress) is None:
            raise SystemExit(f"method {method} failed to start")
    for item in items:
        turn = item["run"] % len(workers)
        for worker in workers[turn:] + workers[:turn]:
            if sample_key(worker.method, item) not in done:
                worker.ask(item, progress)
    for worker in workers:
        worker.close(progress)


def check_against_ar(out: Path) -> int:
    """Greedy outputs against ar's on the same sample: the number that differ
    in a float32 run (a bug). In half precision the batch shapes of
    verification change the rounding, so stock speculation diverges from ar
    too: those differences are printed and not counted."""
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    exact = lines[0]["dtype"] == "float32"
    records = [r for r in lines if r.get("kind") == "sample"]
    reference = {(r["input"], r["sample"], r["run"]): r["token_ids"]
                 for r in records if r["method"] == "ar"}
    mismatches = 0
    for r in records:
        expected = reference.get((r["input"], r["sample"], r["run"]))
        if r["method"] != "ar" and expected is not None and r["token_ids"] != expected:
            mismatches += exact
            verdict = ("greedy speculation must be lossless: this is a bug" if exact else
                       f"{lines[0]['dtype']} rounding; lossless checks need float32")
            print(f"!!! OUTPUT MISMATCH vs ar: {r['method']} {r['input']} sample {r['sample']} "
                  f"-- {verdict}", flush=True)
    return mismatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=["tiny", "qwen-coder"], default="tiny")
    parser.add_argument("--target")
    parser.add_argument("--draft", help="the draft (or EAGLE head) to use with --pair's target")
    parser.add_argument("--inputs", nargs="+", required=True, help="JSONL files with 'text'")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["ar", "draft_model", "specextend"])
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-model-len", type=int,
                        help="default: the target's max_position_embeddings")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=4,
                        help="one request runs at a time; this bounds what engines "
                             "reserve per sequence (SpecExtend's working caches)")
    parser.add_argument("--window-tokens", type=int,
                        help="long outputs: drafts and accepted tokens per this many "
                             "output tokens")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="skip torch.compile (minutes per engine on small CPUs); "
                             "applies to every method alike")
    parser.add_argument("--interleave", action="store_true",
                        help="a fresh engine per method and sample, methods in turn "
                             "(for A/B timings on a noisy machine)")
    parser.add_argument("--paired", action="store_true",
                        help="one engine per method, all loaded at once, prefix caching "
                             "on; every sample decoded --runs times by each in turn")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/long_input.jsonl"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.interleave and args.paired:
        parser.error("--interleave and --paired are two ways to pair methods: pick one")
    if args.worker:
        return run_method(json.loads(Path(args.worker).read_text()))

    from tqdm import tqdm

    if args.target and args.draft:
        target, draft = args.target, args.draft
    elif args.pair == "tiny":
        from vllm_specextend.models.tiny import build_tiny_pair

        pair = build_tiny_pair()
        target, draft = pair.target, args.draft or pair.draft
    else:
        from vllm_specextend.models.qwen_coder import prepare_pair

        pair = prepare_pair()
        target, draft = pair.target, args.draft or pair.draft
    for method in args.methods:
        parse_method(method)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not args.resume:
        raise SystemExit(f"{out} exists: pass --resume to continue it, or another --out")
    done = done_keys(out)
    if not out.exists():
        header = {"kind": "header", "machine": machine(), "target": target, "draft": draft,
                  "k": args.num_speculative_tokens, "dtype": args.dtype,
                  "max_new_tokens": args.max_new_tokens, "prefix_caching": args.paired,
                  "window_tokens": args.window_tokens,
                  "kv_cache_gib": args.kv_cache_gib, "max_num_seqs": args.max_num_seqs,
                  "cpu_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                  "enforce_eager": args.enforce_eager,
                  "chat_template": not args.no_chat_template,
                  "interleaved": args.interleave, "paired": args.paired,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        out.write_text(json.dumps(header) + "\n")
    items = [{"input": Path(path).name, "sample": i, "run": run, "text": text}
             for path in args.inputs
             for i, text in enumerate(load_samples(path, args.samples))
             for run in range(args.runs)]
    progress = tqdm(total=len(args.methods) * len(items)
                    - sum(sample_key(m, i) in done for m in args.methods for i in items),
                    desc="sweep", unit="sample")

    def job_for(method: str, batch: list[dict]) -> dict:
        return {"method": method, "items": batch, "serve": args.paired, "target": target,
                "out": str(out),
                "speculative_config": speculative_config(method, draft,
                                                         args.num_speculative_tokens),
                "max_model_len": args.max_model_len, "dtype": args.dtype,
                "kv_cache_gib": args.kv_cache_gib, "max_new_tokens": args.max_new_tokens,
                "max_num_seqs": args.max_num_seqs, "window_tokens": args.window_tokens,
                "chat_template": not args.no_chat_template,
                "enforce_eager": args.enforce_eager}

    if args.paired:
        run_paired(args.methods, items, done, job_for, out, progress)
    else:
        for method, batch in plan_engines(args.methods, items, done, args.interleave):
            if batch:
                worker = Worker(job_for(method, batch), out.with_suffix(".job.json"))
                worker.close(progress)
    progress.close()
    mismatches = check_against_ar(out)
    print(f"results: {out} ({'no' if not mismatches else mismatches} output mismatches vs ar)")
    if mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
