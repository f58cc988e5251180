"""Soak: drive vLLM's OpenAI server running `method: specextend` with many
concurrent requests, then check that it held up.

    python benchmarks/soak.py [--requests 1000] [--concurrency 16]

The load, on the built-in tiny pair (draft positions 2,048, target 4,096):
prompts from GovReport text (benchmarks/data), short, medium and past the
draft's positions, half of them behind one of a few shared prefixes (prefix
caching on); greedy and sampled; streamed and not, with some streaming
clients hanging up after two chunks; a KV cache of a few blocks, so that
requests are preempted; chunked prefill. Afterwards the same load runs on a target-only server (and, with
`--stock-draft-model`, on stock `draft_model`), for the greedy reference and
for the worker's memory growth under the same load.

Checks (exit 1 if any fails): every request not aborted by its client
completed with all its tokens; greedy ids equal target-only; /health never
failed; the plugin holds no per-request state once all requests are done
(the dev server's /collective_rpc "specextend_state"); preemptions, prefix
cache hits and speculation all happened. Writes JSON with the counts and
each server's worker memory before and after.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from machine import machine
from openai_server import counters, openai_server

BENCHMARKS = Path(__file__).parent
DOCUMENTS = BENCHMARKS / "data" / "govreport" / "govreport_8K.jsonl"
MAX_MODEL_LEN = 4096
# (share, shortest, longest) prompt lengths; the draft reads 2,048 positions.
LENGTH_CLASSES = ((0.3, 32, 300), (0.45, 300, 1800), (0.25, 2100, 4000))
SHARED_PREFIX_LEN = 512
# Outputs long enough that running requests outgrow a small cache (vLLM
# admits a request when its prompt fits, so preemption comes from growth).
MAX_TOKENS_RANGE = (16, 96)
REQUEST_TIMEOUT_S = 900


@dataclass
class SoakRequest:
    index: int
    prompt: list[int]
    max_tokens: int
    greedy: bool
    stream: bool
    hang_up_after_chunks: int | None  # a client that disconnects mid-stream

    def body(self, model: str) -> dict:
        # No `seed`: vLLM 0.32's CPU runner fails on a seeded request whose
        # prompt is split by chunked prefill ("CPU Generator does not use
        # offset"), with or without speculation.
        sampling = {"temperature": 0.0} if self.greedy else {"temperature": 0.8, "top_p": 0.95}
        return {"model": model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "ignore_eos": True, "return_token_ids": True, "stream": self.stream,
                **sampling}


@dataclass
class Outcome:
    status: str  # "completed", "aborted" (by its client) or "failed"
    token_ids: list[int]
    detail: str = ""


def build_requests(token_ids_of, count: int, seed: int) -> list[SoakRequest]:
    rng = random.Random(seed)
    documents = [token_ids_of(json.loads(line)["text"])
                 for line in DOCUMENTS.read_text().splitlines()]
    prefixes = [document[:SHARED_PREFIX_LEN] for document in documents[:4]]
    soak_requests = []
    for index in range(count):
        max_tokens = rng.randint(*MAX_TOKENS_RANGE)
        shares, lows, highs = zip(*LENGTH_CLASSES)
        [(low, high)] = rng.choices(list(zip(lows, highs)), weights=shares)
        length = min(rng.randint(low, high), MAX_MODEL_LEN - max_tokens)
        prefix = rng.choice(prefixes) if rng.random() < 0.5 else []
        document = rng.choice(documents)
        start = rng.randrange(len(document) - length)
        prompt = (prefix + document[start:start + length])[:length]
        stream = rng.random() < 0.5
        hang_up = 2 if stream and rng.random() < 0.2 else None
        soak_requests.append(SoakRequest(index, prompt, max_tokens, rng.random() < 0.6,
                                         stream, hang_up))
    return soak_requests


def send(base: str, model: str, request: SoakRequest) -> Outcome:
    try:
        response = requests.post(f"{base}/v1/completions", json=request.body(model),
                                 stream=request.stream, timeout=REQUEST_TIMEOUT_S)
        if response.status_code != 200:
            return Outcome("failed", [], f"HTTP {response.status_code}: {response.text[:300]}")
        if not request.stream:
            [choice] = response.json()["choices"]
            return _finished(request, choice["token_ids"], choice["finish_reason"])
        token_ids, finish_reason = [], None
        with response:
            for chunks, line in enumerate(response.iter_lines()):
                if request.hang_up_after_chunks is not None and chunks >= request.hang_up_after_chunks:
                    return Outcome("aborted", token_ids)
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    return Outcome("failed", token_ids, f"stream error: {event['error']}")
                for choice in event["choices"]:
                    token_ids += choice.get("token_ids") or []
                    finish_reason = choice.get("finish_reason") or finish_reason
        return _finished(request, token_ids, finish_reason)
    except requests.RequestException as error:
        return Outcome("failed", [], repr(error))


def _finished(request: SoakRequest, token_ids: list[int], finish_reason) -> Outcome:
    if finish_reason != "length" or len(token_ids) != request.max_tokens:
        return Outcome("failed", token_ids,
                       f"finish_reason={finish_reason}, {len(token_ids)} of {request.max_tokens} tokens")
    return Outcome("completed", token_ids)


def run_load(base: str, model: str, soak_requests: list[SoakRequest],
             concurrency: int) -> list[Outcome]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda request: send(base, model, request), soak_requests))


class HealthWatch:
    """Polls /health every second while the load runs."""

    def __init__(self, base: str):
        self.base, self.polls, self.failures = base, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.wait(1.0):
            self.polls += 1
            try:
                status = requests.get(f"{self.base}/health", timeout=30).status_code
            except requests.RequestException as error:
                status = repr(error)
            if status != 200:
                self.failures.append(str(status))


@dataclass
class ServerRun:
    outcomes: list[Outcome]
    state_before: dict
    state_after: dict
    totals: dict
    health: "HealthWatch"
    load_seconds: float

    @property
    def rss_growth_mib(self) -> float:
        return (self.state_after["rss_bytes"] - self.state_before["rss_bytes"]) / 2**20

    def memory(self) -> dict:
        """The worker's resident memory, glibc's heap (in use, and freed but
        kept; MiB) and Python's allocated blocks, before and after the load."""
        report = {"rss_growth_mib": self.rss_growth_mib, "load_seconds": self.load_seconds,
                  "preemptions": self.totals.get("vllm:num_preemptions_total")}
        for when, state in (("before", self.state_before), ("after", self.state_after)):
            for key in ("rss_bytes", "malloc_in_use_bytes", "malloc_free_held_bytes"):
                if key in state:
                    report[f"{key.removesuffix('_bytes')}_{when}_mib"] = state[key] / 2**20
            report[f"python_allocated_blocks_{when}"] = state.get("python_allocated_blocks")
        return report


def soak_server(model: str, args: list[str], log_path: Path, soak_requests: list[SoakRequest],
                concurrency: int) -> ServerRun:
    """The load on one server (dev mode, for the worker's state RPC)."""
    print(f"load on {log_path.name}", flush=True)
    with openai_server(model, args, log_path, VLLM_SERVER_DEV_MODE="1") as base:
        state_before = plugin_state(base)
        started = time.monotonic()
        with HealthWatch(base) as health:
            outcomes = run_load(base, model, soak_requests, concurrency)
        load_seconds = round(time.monotonic() - started, 1)
        return ServerRun(outcomes, state_before, plugin_state(base), counters(base), health,
                         load_seconds)


def plugin_state(base: str, settle_s: float = 120.0) -> dict:
    """The worker's `specextend_state` once vLLM holds no request (aborted
    streams are released asynchronously)."""
    deadline = time.monotonic() + settle_s
    while True:
        response = requests.post(f"{base}/collective_rpc", timeout=60,
                                 json={"method": "specextend_state"})
        response.raise_for_status()
        [state] = response.json()["results"]
        if state.get("vllm_requests", 0) == 0 or time.monotonic() > deadline:
            return state
        time.sleep(1.0)


def server_args(kv_blocks: int, max_num_seqs: int) -> list[str]:
    # Blocks of 32 tokens on every server: SpecExtend picks them for its
    # chunks, and stock's CPU default (128) would give it 4x the cache.
    return ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
            "--block-size", "32",
            "--gpu-memory-utilization", "0.1", "--enable-prefix-caching",
            "--max-num-batched-tokens", "512", "--max-num-seqs", str(max_num_seqs),
            "--num-gpu-blocks-override", str(kv_blocks)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=130,
                        help="KV cache blocks (32 tokens each on CPU): a few more than "
                             "one longest request needs, to force preemption")
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stock-draft-model", action="store_true",
                        help="also run the load on stock draft_model, for its memory growth")
    parser.add_argument("--output", type=Path,
                        default=BENCHMARKS / "results" / "soak_tiny_cpu.json")
    parser.add_argument("--log-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "specextend-soak")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from vllm_specextend.models.tiny import build_tiny_pair

    pair = build_tiny_pair()
    tokenizer = AutoTokenizer.from_pretrained(pair.target)
    soak_requests = build_requests(
        lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
        args.requests, args.seed)
    speculative_config = {"method": "specextend", "model": pair.draft,
                          "num_speculative_tokens": args.num_speculative_tokens}
    base_args = server_args(args.kv_blocks, args.concurrency)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    logs = args.log_dir / "soak"
    print(f"server logs: {logs}.*.log", flush=True)
    print(f"{len(soak_requests)} requests, {args.concurrency} at a time", flush=True)

    runs = {"specextend": soak_server(
        pair.target, [*base_args, "--speculative-config", json.dumps(speculative_config)],
        Path(f"{logs}.specextend.log"), soak_requests, args.concurrency)}
    if args.stock_draft_model:
        stock_config = {"method": "draft_model", "model": pair.draft,
                        "num_speculative_tokens": args.num_speculative_tokens}
        runs["draft_model"] = soak_server(
            pair.target, [*base_args, "--speculative-config", json.dumps(stock_config)],
            Path(f"{logs}.draft_model.log"), soak_requests, args.concurrency)
    runs["target_only"] = soak_server(pair.target, base_args, Path(f"{logs}.target_only.log"),
                                      soak_requests, args.concurrency)
    ours = runs["specextend"]
    outcomes, state_after, totals, health = ours.outcomes, ours.state_after, ours.totals, ours.health
    # Greedy requests that completed under both servers (a client that hangs
    # up does so after the same chunk under each).
    reference = runs["target_only"].outcomes
    replayed = [request for request, outcome, expected in zip(soak_requests, outcomes, reference)
                if request.greedy and outcome.status == expected.status == "completed"]
    greedy_mismatches = [r.index for r in replayed
                         if outcomes[r.index].token_ids != reference[r.index].token_ids]

    statuses = [outcome.status for outcome in outcomes]
    failures = [{"index": i, "detail": o.detail} for i, o in enumerate(outcomes)
                if o.status == "failed"]
    leftover = {key: state_after.get(key) for key in
                ("vllm_requests", "working_cache_holders", "proposed_trees")}
    checks = {
        "every_request_not_aborted_completed": not failures,
        "greedy_equal_target_only": not greedy_mismatches and bool(replayed),
        "server_stayed_healthy": not health.failures and health.polls > 0,
        "plugin_state_empty_after": state_after.get("specextend") is True
                                    and not any(leftover.values()),
        "preempted": totals.get("vllm:num_preemptions_total", 0) > 0,
        "prefix_cache_hit": totals.get("vllm:prefix_cache_hits_total", 0) > 0,
        "speculated": totals.get("vllm:spec_decode_num_accepted_tokens_total", 0) > 0,
        # The worker's totals in vLLM's /metrics, through the front end.
        "specextend_metrics_served": all(
            state_after.get(key, 0) > 0
            and totals.get(f"vllm:specextend_{name}_total") == state_after[key]
            for key, name in (("refreshes", "refreshes"), ("policy_rounds", "policy_rounds"))),
    }
    drafts = totals.get("vllm:spec_decode_num_drafts_total", 0)
    report = {
        "machine": machine(),
        "settings": {**vars(args), "output": str(args.output), "log_dir": str(args.log_dir),
                     "speculative_config": speculative_config, "server_args": base_args},
        "requests": len(soak_requests),
        "completed": statuses.count("completed"),
        "aborted_by_client": statuses.count("aborted"),
        "failed": failures[:20],
        "greedy_compared": len(replayed),
        "greedy_mismatches": greedy_mismatches,
        "sampled_completed": sum(not r.greedy and o.status == "completed"
                                 for r, o in zip(soak_requests, outcomes)),
        "long_prompts_past_draft_positions": sum(len(r.prompt) > 2048 for r in soak_requests),
        "health_polls": health.polls,
        "health_failures": health.failures[:20],
        "preemptions": totals.get("vllm:num_preemptions_total", 0),
        "prefix_cache_hits_tokens": totals.get("vllm:prefix_cache_hits_total", 0),
        "mean_accepted_length": (1 + totals.get("vllm:spec_decode_num_accepted_tokens_total", 0)
                                 / drafts) if drafts else None,
        "plugin_state_before": ours.state_before,
        "plugin_state_after": state_after,
        "worker_rss_growth_mib": ours.rss_growth_mib,
        "load_seconds": ours.load_seconds,
        "memory_by_server": {name: run.memory() for name, run in runs.items()},
        "checks": checks,
    }
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({key: report[key] for key in
                      ("completed", "aborted_by_client", "greedy_compared", "preemptions",
                       "prefix_cache_hits_tokens", "mean_accepted_length",
                       "memory_by_server", "checks")}, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
