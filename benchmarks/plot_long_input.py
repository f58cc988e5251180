"""Plot and tabulate a long_input.py results file.

    python benchmarks/plot_long_input.py benchmarks/results/long_input_cpu.jsonl

Writes NAME.png (mean accepted length and decode speed vs input length, one
line per method) and NAME.md (a markdown table, speed also as a ratio to ar);
for a long-output run (--window-tokens) also NAME.windows.png, mean accepted
length against output position.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

DIFFERENT_TEXT = "†"  # marks a paired run whose two outputs differ


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def summarize(lines: list[dict]) -> tuple[dict, list[dict]]:
    header = next(r for r in lines if r["kind"] == "header")
    groups = defaultdict(list)
    for r in lines:
        if r["kind"] == "sample":
            groups[(r["method"], r["input"])].append(r)
    ar_ids = {key: r["token_ids"] for key, r in ar_runs(lines).items()}

    def mean(rows, key):
        values = [r[key] for r in rows if r[key] is not None]
        return statistics.mean(values) if values else None

    rows = []
    for (method, source), samples in groups.items():
        rows.append({
            "method": method, "input": source, "samples": len(samples),
            "prompt_tokens": mean(samples, "prompt_tokens"),
            "prefill_s": mean(samples, "prefill_s"),
            "decode_tokens_per_s": mean(samples, "decode_tokens_per_s"),
            "mean_accepted_length": mean(samples, "mean_accepted_length"),
            "acceptance_rate": mean(samples, "acceptance_rate"),
            "equal_to_ar": None if method == "ar" else equal_to(samples, ar_ids),
        })
    # Against ar on the same samples: a method run on fewer samples is
    # compared with ar's speed on those.
    ar_speed = {key: r["decode_tokens_per_s"] for key, r in ar_runs(lines).items()}
    for (method, source), samples in groups.items():
        row = next(r for r in rows if (r["method"], r["input"]) == (method, source))
        base = [ar_speed[key] for key in map(run_key, samples) if key in ar_speed]
        row["speed_vs_ar"] = (row["decode_tokens_per_s"] / statistics.mean(base)
                              if base and len(base) == len(samples) else None)
    ar_tokens = {r["input"]: r["prompt_tokens"] for r in rows if r["method"] == "ar"}
    rows.sort(key=lambda r: (ar_tokens.get(r["input"], r["prompt_tokens"]), r["method"]))
    return header, rows


def run_key(record: dict) -> tuple:
    return record["input"], record["sample"], record["run"]


def ar_runs(lines: list[dict]) -> dict:
    return {run_key(r): r for r in lines if r["kind"] == "sample" and r["method"] == "ar"}


def equal_to(samples: list[dict], reference: dict) -> tuple[int, int]:
    """(samples whose greedy output equals the reference's, samples with one)."""
    pairs = [(r["token_ids"], reference.get((r["input"], r["sample"], r["run"])))
             for r in samples]
    compared = [(got, expected) for got, expected in pairs if expected is not None]
    return sum(got == expected for got, expected in compared), len(compared)


def table(header: dict, rows: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    out = [f"Machine: {header['machine']}; k={header['k']}, {header['dtype']}, "
           f"{header['max_new_tokens']} new tokens, greedy.", "",
           "| input | prompt tokens | method | samples | prefill s | decode tok/s | "
           "vs ar | mean accepted length | acceptance rate | output = ar |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        equal = "-" if r["equal_to_ar"] is None else "{}/{}".format(*r["equal_to_ar"])
        out.append(f"| {r['input']} | {fmt(r['prompt_tokens'], '.0f')} | {r['method']} | "
                   f"{r['samples']} | {fmt(r['prefill_s'], '.1f')} | "
                   f"{fmt(r['decode_tokens_per_s'], '.2f')} | {fmt(r['speed_vs_ar'], '.2f')}x | "
                   f"{fmt(r['mean_accepted_length'], '.2f')} | "
                   f"{fmt(r['acceptance_rate'], '.2f')} | {equal} |")
    return "\n".join(out) + "\n"


def prefill_pairs(lines: list[dict]) -> str:
    """Interleaved runs (one engine per method and sample, in turn): each
    sample's prefill per method and the ratio to the first method, engine
    by engine, with their geometric mean: the A/B a noisy machine needs."""
    samples = [r for r in lines if r["kind"] == "sample"]
    methods = list(dict.fromkeys(r["method"] for r in samples))
    base, others = methods[0], methods[1:]
    by_key = defaultdict(dict)
    for r in samples:
        by_key[run_key(r)][r["method"]] = r
    out = ["", f"Prefill s per sample, one engine each, methods in turn; ratio to {base}:", "",
           "| input | sample | run | " + " | ".join(methods) + " | "
           + " | ".join(f"{m} / {base}" for m in others) + " | same output |",
           "|---" * (4 + len(methods) + len(others)) + "|"]
    ratios = defaultdict(list)
    for (source, sample, run), runs in sorted(by_key.items()):
        cells = [f"{runs[m]['prefill_s']:.1f}" if m in runs else "-" for m in methods]
        for m in others:
            if m in runs and base in runs:
                ratios[m].append(runs[m]["prefill_s"] / runs[base]["prefill_s"])
                cells.append(f"{ratios[m][-1]:.3f}x")
            else:
                cells.append("-")
        same = len({tuple(r["token_ids"]) for r in runs.values()}) == 1
        out.append(f"| {source} | {sample} | {run} | " + " | ".join(cells)
                   + f" | {'yes' if same else 'NO'} |")
    means = [f"{statistics.geometric_mean(ratios[m]):.3f}x" if ratios[m] else "-" for m in others]
    out.append("| geometric mean | | | " + " | ".join([""] * len(methods) + means) + " | |")
    return "\n".join(out) + "\n"


def paired_ratios(lines: list[dict]) -> str:
    """Paired runs (every method's engine loaded at once, each sample decoded
    by every method in turn, run after run): each method's decode speed
    against the first method's in the same run, the first run (it paid the
    prefill and, for a new engine, its warm-up) apart from the median of the
    later ones (the prompt cached). A run whose two outputs differ (bf16
    rounds with the batch's shape) is marked: its ratio is between two texts."""
    samples = [r for r in lines if r["kind"] == "sample"]
    methods = list(dict.fromkeys(r["method"] for r in samples))
    base, others = methods[0], methods[1:]
    by_sample = defaultdict(lambda: defaultdict(dict))  # (input, sample) -> run -> method
    for r in samples:
        by_sample[(r["input"], r["sample"])][r["run"]][r["method"]] = r
    out = ["", f"Paired: decode tok/s against {base} in the same run, run 0; later runs -> "
           f"their median ({DIFFERENT_TEXT}: the two outputs differ):", "",
           "| input | sample | " + " | ".join(others) + " |", "|---" * (2 + len(others)) + "|"]
    medians = defaultdict(list)
    for (source, sample), runs in sorted(by_sample.items()):
        cells = []
        for method in others:
            pairs = [(run[method], run[base]) for _, run in sorted(runs.items())
                     if method in run and base in run]
            if not pairs:
                cells.append("-")
                continue
            ratios = [ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
                      for ours, theirs in pairs]
            marks = [DIFFERENT_TEXT if ours["token_ids"] != theirs["token_ids"] else ""
                     for ours, theirs in pairs]
            later = ratios[1:]
            if later:
                medians[method].append(statistics.median(later))
            shown = [f"{r:.2f}x{mark}" for r, mark in zip(ratios, marks)]
            cells.append(f"{shown[0]}; " + ", ".join(shown[1:])
                         + (f" -> {medians[method][-1]:.2f}x" if later else ""))
        out.append(f"| {source} | {sample} | " + " | ".join(cells) + " |")
    out.append("| mean of medians | | " + " | ".join(
        f"{statistics.mean(medians[m]):.2f}x" if medians[m] else "-" for m in others) + " |")
    return "\n".join(out) + "\n"


def against_best_stock(lines: list[dict]) -> str:
    """Each sample's decode speed against the better of target-only and
    stock speculation on that sample (the per-request policy's goal), with
    what the policy picked: mean draft length, share of request rounds
    stepped aside, probes; and where a request had the choice of context,
    the share of its rounds over a working cache."""
    samples = [r for r in lines if r["kind"] == "sample"]
    by_key = defaultdict(dict)
    for r in samples:
        by_key[run_key(r)][r["method"]] = r
    stock = [m for m in ("ar", "draft_model", "eagle3") if any(m in runs for runs in
                                                               by_key.values())]
    ours = list(dict.fromkeys(r["method"] for r in samples if r["method"].startswith(
        "specextend")))
    if len(stock) < 2 or not ours:
        return ""
    out = ["", f"Per sample, decode tok/s against max({', '.join(stock)}) on the same sample; "
           "policy: mean draft length / share of request rounds stepped aside / probes"
           " (/ share of rounds over a working cache, where a request had the choice):", "",
           "| input | sample | best stock | " + " | ".join(ours) + " |",
           "|---" * (3 + len(ours)) + "|"]
    ratios = defaultdict(list)
    for (source, sample, run), runs in sorted(by_key.items()):
        if not all(m in runs for m in stock):
            continue
        best = max(stock, key=lambda m: runs[m]["decode_tokens_per_s"])
        cells = []
        for method in ours:
            r = runs.get(method)
            if r is None:
                cells.append("-")
                continue
            ratios[method].append(r["decode_tokens_per_s"] / runs[best]["decode_tokens_per_s"])
            policy = r.get("policy")
            picked = ("" if not policy or policy["mean_pick"] is None else
                      f" ({policy['mean_pick']:.2f} / {policy['stepped_aside_fraction']:.0%}"
                      f" / {policy['probes']}{_context_share(policy)})")
            cells.append(f"{ratios[method][-1]:.2f}x{picked}")
        out.append(f"| {source} | {sample} | {best} "
                   f"{runs[best]['decode_tokens_per_s']:.2f} | " + " | ".join(cells) + " |")
    means = [f"{statistics.mean(ratios[m]):.2f}x (min {min(ratios[m]):.2f}x)"
             if ratios[m] else "-" for m in ours]
    out.append("| mean | | | " + " | ".join(means) + " |")
    return "\n".join(out) + "\n"


def _context_share(policy: dict) -> str:
    """The share of rounds over a working cache of the requests that had the
    choice of context, as " / 40% cache"; empty if none had."""
    rounds = policy.get("context_rounds") or {}
    total = sum(rounds.values())
    return f" / {rounds['working_cache'] / total:.0%} cache" if total else ""


def accepted_by_window(lines: list[dict], window_tokens: int) -> dict:
    """Long outputs (--window-tokens): per method, each output window's end
    (tokens) and the mean accepted length over its drafting steps, all
    samples together."""
    totals = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in lines:
        if r["kind"] == "sample" and r.get("output_windows"):
            for index, window in enumerate(r["output_windows"]):
                end = min((index + 1) * window_tokens, window["output_tokens"])
                totals[r["method"]][end][0] += window["drafts"]
                totals[r["method"]][end][1] += window["accepted"]
    return {method: {end: 1 + accepted / drafts if drafts else None
                     for end, (drafts, accepted) in sorted(windows.items())}
            for method, windows in totals.items()}


def windows_table(by_window: dict) -> str:
    ends = sorted({end for windows in by_window.values() for end in windows})
    out = ["", "Mean accepted length by output position (tokens of output at the window's "
           "end; '-': no drafting step in it):", "",
           "| method | " + " | ".join(f"{end:,}" for end in ends) + " |",
           "|---" * (1 + len(ends)) + "|"]
    for method, windows in by_window.items():
        cells = ["-" if windows.get(end) is None else f"{windows[end]:.2f}" for end in ends]
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_windows(header: dict, by_window: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, (method, windows) in enumerate(by_window.items()):
        points = [(end, value) for end, value in windows.items() if value is not None]
        ax.plot(*zip(*points), marker="o", label=method, color=f"C{index}")
    ax.set(xlabel="output tokens (window end)", ylabel="mean accepted length (tokens/step)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"{Path(header['target']).parent.name} - {header['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def dataset_of(row: dict) -> str:
    return row["input"].split("_")[0]


def plot(header: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accepted_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 4))
    # One line per method and dataset ("govreport_8K.jsonl" -> "govreport"):
    # a method's colour, a dataset's line style, the same in both panels.
    datasets = sorted({dataset_of(r) for r in rows})
    methods = sorted({r["method"] for r in rows})
    for (index, method), (number, dataset) in itertools.product(enumerate(methods),
                                                               enumerate(datasets)):
        mine = [r for r in rows if r["method"] == method and dataset_of(r) == dataset]
        if not mine:
            continue
        lengths = [r["prompt_tokens"] for r in mine]
        label = method if len(datasets) == 1 else f"{method} ({dataset})"
        style = {"marker": "os^"[number % 3], "linestyle": ["-", "--", ":"][number % 3],
                 "label": label, "color": f"C{index}"}
        if method != "ar":
            accepted_ax.plot(lengths, [r["mean_accepted_length"] for r in mine], **style)
        speed_ax.plot(lengths, [r["decode_tokens_per_s"] for r in mine], **style)
    accepted_ax.set(xlabel="input tokens", ylabel="mean accepted length (tokens/step)")
    speed_ax.set(xlabel="input tokens", ylabel="decode tokens/s")
    for ax in (accepted_ax, speed_ax):
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{Path(header['target']).parent.name} / {Path(header['draft']).parent.name}"
                 f" - {header['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    path = Path(sys.argv[1])
    lines = records(path)
    header, rows = summarize(lines)
    text = table(header, rows)
    text += against_best_stock(lines)
    if header.get("interleaved"):
        text += prefill_pairs(lines)
    if header.get("paired"):
        text += paired_ratios(lines)
    by_window = (accepted_by_window(lines, header["window_tokens"])
                 if header.get("window_tokens") else {})
    if by_window:
        text += windows_table(by_window)
        plot_windows(header, by_window, path.with_suffix(".windows.png"))
    path.with_suffix(".md").write_text(text)
    plot(header, rows, path.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
