"""The speculation policy on simulated requests: acceptance and step costs
drawn as an engine would measure them, the policy's own code deciding.

    python benchmarks/policy_simulation.py \
        --out benchmarks/results/policy_simulation.json

Each simulated request decodes one token a step at a fixed per-draft
acceptance rate; a step costs S(m) for its longest draft m (default: the
costs the policy measured on GovReport 8K, Qwen pair, fp32), times timing
noise; a round where every request stepped aside skips the draft, and the
next round that drafts after two or more skipped first pays a catch-up
(one draft forward). The first round shares its step with the prefill and
is not priced, as in the engine. Tokens per second are compared with the
target alone (S(0) a step) and stock speculation (k drafts every step),
per acceptance rate, request length and policy variant (`--variants`:
SpeculationPolicy keyword arguments as JSON). No engine, no timing of this
machine: the numbers show what the policy's decisions cost, not vLLM's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vllm_specextend.policy.costs import StepCosts
from vllm_specextend.policy.speculation_policy import SpeculationPolicy

# benchmarks/results/cost_recheck_govreport8K_cpu.jsonl, specextend, sample 1.
GOVREPORT_8K_COSTS = (0.425, 0.613, 0.796, 1.003, 1.169)
# The policy before: a 3% expected gain asked of every round, drafting or not.
VARIANTS = {"default": {}, "3% to keep drafting (before)": {"keep_gain": 0.03}}


def simulate_request(policy_settings: dict, rate: float, steps: int, costs: StepCosts,
                     catch_up_s: float, noise: float, seed: int) -> float:
    """Tokens per second of one request in a fresh engine."""
    max_drafts = len(costs.step_by_round_length) - 1
    policy = SpeculationPolicy(max_drafts=max_drafts, max_requests=1, **policy_settings)
    rng = np.random.default_rng(seed)
    decoding = np.ones(1, dtype=bool)
    skipped, seconds, tokens = 0, 0.0, 0
    for step in range(steps):
        behind = skipped >= 2
        length = int(policy.pick(["r"], decoding, max_drafts, 8000, draft_behind=behind)[0])
        accepted = 0
        while accepted < length and rng.random() < rate:
            accepted += 1
        policy.observe_step(["r"], np.array([length]), np.array([accepted]))
        caught_up = length > 0 and behind
        step_s = (costs.step_seconds(length, length) * max(1 + noise * rng.standard_normal(), 0.1)
                  + catch_up_s * caught_up)
        if step > 0:
            policy.observe_cost(length, length, step_s, 8000, caught_up=caught_up)
        seconds += step_s
        tokens += 1 + accepted
        skipped = skipped + 1 if length == 0 else 0
    return tokens / seconds


def stock_tokens_per_second(rate: float, costs: StepCosts) -> float:
    k = len(costs.step_by_round_length) - 1
    return sum(rate ** i for i in range(k + 1)) / costs.step_by_round_length[k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--costs", type=float, nargs="+", default=GOVREPORT_8K_COSTS,
                        help="S(0) .. S(k), seconds")
    parser.add_argument("--catch-up", type=float,
                        help="seconds; default: one draft forward, S(2) - S(1)")
    parser.add_argument("--noise", type=float, default=0.15,
                        help="relative standard deviation of a step's measured time")
    parser.add_argument("--rates", type=float, nargs="+",
                        default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--variants", type=json.loads, default=VARIANTS)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    costs = StepCosts(tuple(args.costs), 0.0)
    catch_up = args.catch_up if args.catch_up is not None else args.costs[2] - args.costs[1]
    target_only = 1 / costs.step_by_round_length[0]
    rows = []
    for steps in args.steps:
        for rate in args.rates:
            stock = stock_tokens_per_second(rate, costs)
            best = max(target_only, stock)
            row = {"steps": steps, "rate": rate, "stock_vs_ar": stock / target_only}
            for name, settings in args.variants.items():
                speeds = [simulate_request(settings, rate, steps, costs, catch_up, args.noise,
                                           seed) for seed in range(args.seeds)]
                row[name] = float(np.mean(speeds) / best)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.write_text(json.dumps({"costs_s": args.costs, "catch_up_s": catch_up,
                               "noise": args.noise, "seeds": args.seeds,
                               "variants": args.variants, "rows": rows}, indent=1))
    write_table(rows, list(args.variants), out.with_suffix(".md"))
    plot(rows, list(args.variants), out.with_suffix(".png"))


def write_table(rows: list[dict], variants: list[str], path: Path) -> None:
    lines = ["Simulated tokens/s against max(target alone, stock speculation):", "",
             "| steps | acceptance | stock vs ar | " + " | ".join(variants) + " |",
             "|---" * (3 + len(variants)) + "|"]
    for row in rows:
        lines.append(f"| {row['steps']} | {row['rate']:.1f} | {row['stock_vs_ar']:.2f}x | "
                     + " | ".join(f"{row[name]:.3f}x" for name in variants) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({row["steps"] for row in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.6), sharey=True)
    for ax, steps in zip(np.atleast_1d(axes), lengths):
        chosen = [row for row in rows if row["steps"] == steps]
        rates = [row["rate"] for row in chosen]
        for name in variants:
            ax.plot(rates, [row[name] for row in chosen], marker="o", label=name)
        ax.axhline(0.97, color="grey", linestyle=":", label="0.97x (the goal)")
        ax.set_title(f"{steps} decode steps, a fresh engine")
        ax.set_xlabel("per-draft acceptance")
    np.atleast_1d(axes)[0].set_ylabel("tokens/s vs max(ar, stock)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
