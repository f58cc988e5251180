"""Timestamps for the policy's cost measurements, without waiting for the
device: the host's clock on CPU (vLLM's CPU runner is synchronous), CUDA
events on GPU, read once the later event has happened (a step later)."""

from __future__ import annotations

import time

import torch


class StepClock:
    """Timestamps of the host's clock (CPU) or CUDA events (GPU); an
    interval is read once its end has happened, never by waiting for it."""

    def __init__(self, device: torch.device):
        self.events = device.type == "cuda"

    def now(self):
        if not self.events:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def done(self, stamp) -> bool:
        return not self.events or stamp.query()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.events else end - start
