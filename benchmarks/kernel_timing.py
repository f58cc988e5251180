"""Timing and saving shared by the kernel benchmarks."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


def seconds(fn, repeats: int, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up (and compile)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def save_results(results: dict, out: Path, plot) -> None:
    """`out`.json and `out`.png (drawn by `plot(results, path)`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"results: {out.with_suffix('.json')}, {out.with_suffix('.png')}")
