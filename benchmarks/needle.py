"""Needle retrieval check: a random fact planted deep in a long document and a
question asking for it. The draft can only predict the answer if the fact is
in what it attends to, so acceptance on the answer tokens shows what each
draft context holds: CMR (`specextend`), the recency window of the same
budget (`specextend[selection=recency]`) or the full context
(`specextend[retrieval=false]`).

    python benchmarks/needle.py --pair qwen-coder \
        --haystack benchmarks/data/govreport/govreport_2K.jsonl --samples 3 \
        --depth 0.25 --out benchmarks/results/needle_qwen_cpu --enforce-eager

Writes OUT.prompts.jsonl (prompts and answers), OUT.jsonl (the records of
long_input.py, which runs the methods: same harness, same check against ar)
and OUT.md (a table). Other long_input.py flags pass through.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

from long_input import load_samples

HERE = Path(__file__).resolve().parent
METHODS = ["ar", "specextend", "specextend[selection=recency]", "specextend[retrieval=false]"]
PROJECTS = ["Aurora", "Basalt", "Cobalt", "Driftwood", "Ember", "Fjord", "Granite", "Heron"]


def plant_needle(document: str, tokenizer, rng: random.Random, depth: float) -> dict:
    """The document with a fact inserted at `depth` (0 = start, 1 = end) and
    a question about it appended."""
    project = rng.choice(PROJECTS)
    code = "-".join(str(rng.randrange(1000, 10000)) for _ in range(3))
    ids = tokenizer.encode(document, add_special_tokens=False)
    cut = int(len(ids) * depth)
    before, after = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
    text = (f"{before}\nThe access code for Project {project} is {code}.\n{after}\n\n"
            f"What is the access code for Project {project}? Answer with the code only.")
    return {"text": text, "answer": code, "needle_token": cut, "document_tokens": len(ids)}


def summarize(records: list[dict], prompts: list[dict], tokenizer) -> list[dict]:
    ar_found = {r["sample"]: prompts[r["sample"]]["answer"] in tokenizer.decode(r["token_ids"])
                for r in records if r["method"] == "ar"}
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        accepted = [r["mean_accepted_length"] for r in mine if r["mean_accepted_length"]]
        rates = [r["acceptance_rate"] for r in mine if r["acceptance_rate"] is not None]
        rows.append({
            "method": method, "samples": len(mine),
            "target_answered": sum(ar_found.get(r["sample"], False) for r in mine),
            "mean_accepted_length": statistics.mean(accepted) if accepted else None,
            "acceptance_rate": statistics.mean(rates) if rates else None,
        })
    return rows


def table(rows: list[dict], header: dict, depth: float, max_new_tokens: int) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"Needle at depth {depth} of the document; {max_new_tokens} answer tokens, "
             f"k={header['k']}, greedy. Machine: {header['machine']}.", "",
             "| method | samples | target answered | mean accepted length | acceptance rate |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['samples']} | {r['target_answered']}/{r['samples']} "
                     f"| {fmt(r['mean_accepted_length'])} | {fmt(r['acceptance_rate'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=["tiny", "qwen-coder"], default="tiny")
    parser.add_argument("--haystack", required=True, help="JSONL with 'text' documents")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--depth", type=float, default=0.25)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="path prefix of the outputs")
    args, passthrough = parser.parse_known_args()
    if "ar" not in args.methods:
        raise SystemExit("--methods must include ar: it says whether the target answers")

    from transformers import AutoTokenizer

    if args.pair == "tiny":
        from vllm_specextend.models.tiny import build_tiny_pair as prepare
    else:
        from vllm_specextend.models.qwen_coder import prepare_pair as prepare
    tokenizer = AutoTokenizer.from_pretrained(prepare().target)
    rng = random.Random(args.seed)
    prompts = [plant_needle(text, tokenizer, rng, args.depth)
               for text in load_samples(args.haystack, args.samples)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts_path = out.with_name(out.name + ".prompts.jsonl")
    prompts_path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    results = out.with_name(out.name + ".jsonl")
    subprocess.run([sys.executable, str(HERE / "long_input.py"), "--pair", args.pair,
                    "--inputs", str(prompts_path), "--samples", str(args.samples),
                    "--max-new-tokens", str(args.max_new_tokens), "--methods", *args.methods,
                    "--out", str(results), "--resume", *passthrough], check=True)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    header = next(r for r in lines if r["kind"] == "header")
    rows = summarize([r for r in lines if r["kind"] == "sample"], prompts, tokenizer)
    report = table(rows, header, args.depth, args.max_new_tokens)
    out.with_name(out.name + ".md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
