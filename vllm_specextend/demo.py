"""The main job on the built-in default: one prompt longer than the draft's
positions, served three ways side by side: the target alone, stock vLLM
speculation (`method: draft_model`, same draft and k) and `method:
specextend`.

    python -m vllm_specextend.demo [--target DIR --draft DIR] [--prompt-file F]

Without --target/--draft it builds the tiny random-weight pair (no model hub
needed; draft positions 2,048): its text is noise, the table is the point.
Each method runs in a fresh engine process, greedy, and the table says
whether the three outputs are identical (speculation must be lossless).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# 2,556 byte tokens for the tiny pair's tokenizer: past its draft's
# 2,048 positions, so SpecExtend drafts from a working cache.
DEFAULT_PROMPT = (
    "The committee reviewed the agency's long-term plan for maintaining its "
    "fleet of research vessels, including the costs of repairs, the schedule "
    "for replacing the oldest ships, and the staffing needed at each port. "
) * 12
METHODS = ("target only", "draft_model", "specextend")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target model folder (default: tiny pair)")
    parser.add_argument("--draft", help="draft model folder (default: tiny pair)")
    parser.add_argument("--prompt-file", help="text file to use as the prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument(
        "--speculative-config",
        default="{}",
        help="JSON of extra SpecExtend settings, e.g. '{\"top_k_chunks\": 16}'",
    )
    parser.add_argument("--one-method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_pair(args: argparse.Namespace) -> tuple[str, str]:
    if args.target and args.draft:
        return args.target, args.draft
    if args.target or args.draft:
        raise SystemExit("give both --target and --draft, or neither")
    from vllm_specextend.models.tiny import build_tiny_pair

    pair = build_tiny_pair()
    return pair.target, pair.draft


def speculative_config(method: str, draft: str, args: argparse.Namespace) -> dict | None:
    if method == "target only":
        return None
    extra = json.loads(args.speculative_config) if method == "specextend" else {}
    return {"method": method, "model": draft,
            "num_speculative_tokens": args.num_speculative_tokens, **extra}


def run_one_method(args: argparse.Namespace) -> None:
    """Engine process: generate once, write the measurements as JSON."""
    from vllm import LLM, SamplingParams

    from vllm_specextend.metrics import mean_accepted_length, spec_decode_counters

    target, draft = model_pair(args)
    prompt = Path(args.prompt_file).read_text() if args.prompt_file else DEFAULT_PROMPT
    llm = LLM(model=target,
              speculative_config=speculative_config(args.one_method, draft, args),
              max_model_len=args.max_model_len, dtype="float32", gpu_memory_utilization=0.1,
              disable_log_stats=False, enable_prefix_caching=False, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    [output] = llm.generate([prompt], params, use_tqdm=False)
    stats = output.metrics
    decode_s = stats.last_token_ts - stats.first_token_ts
    tokens = list(output.outputs[0].token_ids)
    counters = spec_decode_counters(llm)
    Path(args.result).write_text(json.dumps({
        "prompt_tokens": len(output.prompt_token_ids),
        "decode_tokens_per_s": (len(tokens) - 1) / decode_s,
        "mean_accepted_length": mean_accepted_length(counters),
        "drafts": counters["vllm:spec_decode_num_drafts"],
        "token_ids": tokens,
        "text": output.outputs[0].text,
    }))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.one_method:
        run_one_method(args)
        return
    target, draft = model_pair(args)
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for method in METHODS:
            print(f"--- {method}: starting an engine ---", flush=True)
            result = Path(folder) / "result.json"
            subprocess.run([sys.executable, "-m", "vllm_specextend.demo", *forwarded,
                            "--one-method", method, "--result", str(result)], check=True)
            results[method] = json.loads(result.read_text())
    print_table(target, draft, results)


def print_table(target: str, draft: str, results: dict[str, dict]) -> None:
    reference = results["target only"]
    speed = reference["decode_tokens_per_s"]
    print("\n=== vllm-specextend demo ===")
    print(f"target: {target}\ndraft:  {draft}")
    print(f"prompt: {reference['prompt_tokens']} tokens, {len(reference['token_ids'])} "
          f"generated greedily by each method\n")
    header = ("method", "decode tok/s", "vs target", "mean accepted", "drafts", "output")
    rows = [header]
    for method, result in results.items():
        accepted = result["mean_accepted_length"]
        rows.append((
            method, f"{result['decode_tokens_per_s']:.1f}",
            f"{result['decode_tokens_per_s'] / speed:.2f}x",
            "-" if accepted is None else f"{accepted:.2f}",
            str(int(result["drafts"])),
            "identical" if result["token_ids"] == reference["token_ids"] else "DIFFERS (bug)",
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print(f"\ntext (target only): {reference['text'][:160]!r}...")


if __name__ == "__main__":
    main()
