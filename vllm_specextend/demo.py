"""The main job on the built-in default: serve one long-ish prompt with
`method: specextend` and report text, speed and mean accepted length.

    python -m vllm_specextend.demo [--target DIR --draft DIR] [--prompt-file F]

Without --target/--draft it builds the tiny random-weight pair (no model hub
needed); its text is noise, the numbers are what it shows.
"""

from __future__ import annotations

import argparse
import json
import os
import time

DEFAULT_PROMPT = (
    "The committee reviewed the agency's long-term plan for maintaining its "
    "fleet of research vessels, including the costs of repairs, the schedule "
    "for replacing the oldest ships, and the staffing needed at each port. "
) * 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target model folder (default: tiny pair)")
    parser.add_argument("--draft", help="draft model folder (default: tiny pair)")
    parser.add_argument("--prompt-file", help="text file to use as the prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument(
        "--speculative-config",
        default="{}",
        help="JSON of extra SpecExtend settings, e.g. '{\"top_k_chunks\": 16}'",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from vllm_specextend.metrics import mean_accepted_length, spec_decode_counters

    if args.target and args.draft:
        target, draft = args.target, args.draft
    elif args.target or args.draft:
        raise SystemExit("give both --target and --draft, or neither")
    else:
        from vllm_specextend.models.tiny import build_tiny_pair

        pair = build_tiny_pair()
        target, draft = pair.target, pair.draft

    prompt = open(args.prompt_file).read() if args.prompt_file else DEFAULT_PROMPT
    llm = LLM(
        model=target,
        speculative_config={
            "method": "specextend",
            "model": draft,
            "num_speculative_tokens": args.num_speculative_tokens,
            **json.loads(args.speculative_config),
        },
        max_model_len=args.max_model_len,
        dtype="float32",
        gpu_memory_utilization=0.1,
        disable_log_stats=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    [output] = llm.generate([prompt], params)
    elapsed = time.perf_counter() - start
    completion = output.outputs[0]
    accepted = mean_accepted_length(spec_decode_counters(llm))
    print("\n=== vllm-specextend demo ===")
    print(f"target: {target}\ndraft:  {draft}")
    print(f"prompt tokens: {len(output.prompt_token_ids)}")
    print(f"generated text: {completion.text!r}")
    print(
        f"generated tokens: {len(completion.token_ids)} in {elapsed:.2f} s "
        f"({len(completion.token_ids) / elapsed:.1f} tokens/s, prefill included)"
    )
    print(
        "mean accepted length (tokens per target step): "
        + (f"{accepted:.2f}" if accepted is not None else "n/a (no drafts)")
    )


if __name__ == "__main__":
    main()
