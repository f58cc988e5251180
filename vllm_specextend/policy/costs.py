"""The engine's step costs, measured while it runs.

A decoding step costs what its round length m (the longest pick) makes it
cost, plus each further verified draft: S(m) + per_verified_token *
(drafts - m). S(m) is measured per m (a decayed mean of whole steps): it
holds every fixed cost of drafting at all (sampling the draft's first
pass, the target's verification of drafts) and the forwards past the first,
which no single straight line fits (m = 0 and m = 1 run the same forwards).
The per-token cost comes from consecutive steps of the same round length
that verified different numbers of drafts (batches), so the level drifting
as contexts grow is not taken for it. A round length not measured yet
costs what its measured neighbours say, extrapolated by their slope.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DecayedLinearFit:
    """y = intercept + slope * x, older samples weighing `decay` times less
    per sample. The slope comes from consecutive samples whose x differs
    (least squares on their differences), so the level drifting as
    contexts grow is not taken for slope; the intercept is the decayed mean
    of y - slope * x (with the current slope). Until two samples differ in
    x the slope is `slope_prior`."""

    def __init__(self, decay: float, slope_prior: float = 0.0):
        self.decay = decay
        self.slope_prior = slope_prior
        self.samples = 0.0
        self._sum_x = self._sum_y = self._dx_dy = self._dx_dx = 0.0
        self._last: tuple[float, float] | None = None

    def break_run(self) -> None:
        """The next sample starts a new run: no difference is taken against
        the last one."""
        self._last = None

    def add(self, x: float, y: float) -> None:
        d = self.decay
        if self._last is not None and x != self._last[0]:
            dx, dy = x - self._last[0], y - self._last[1]
            self._dx_dy = self._dx_dy * d + dx * dy
            self._dx_dx = self._dx_dx * d + dx * dx
        self._last = (x, y)
        self.samples = self.samples * d + 1.0
        self._sum_x = self._sum_x * d + x
        self._sum_y = self._sum_y * d + y

    @property
    def slope(self) -> float:
        if not self._dx_dx:
            return self.slope_prior
        return max(self._dx_dy / self._dx_dx, 0.0)  # more work never costs less

    @property
    def intercept(self) -> float:
        if not self.samples:
            return 0.0
        return max((self._sum_y - self.slope * self._sum_x) / self.samples, 0.0)

    def __call__(self, x: float) -> float:
        return self.intercept + self.slope * x


@dataclass(frozen=True)
class StepCosts:
    """Seconds: a decoding step whose longest draft is m costs
    step_by_round_length[m], plus per_verified_token for each draft past m
    (other requests' drafts verified in the same step)."""

    step_by_round_length: tuple[float, ...]
    per_verified_token: float

    def step_seconds(self, round_length: int, drafts: int) -> float:
        return (self.step_by_round_length[round_length]
                + self.per_verified_token * (drafts - round_length))


class MeasuredCosts:
    def __init__(self, max_drafts: int, decay: float = 0.9):
        self.decay = decay
        self.step_sum = np.zeros(max_drafts + 1)
        self.step_weight = np.zeros(max_drafts + 1)
        self.verify = DecayedLinearFit(decay)
        self._round_length_of_last = None

    def observe_step(self, round_length: int, drafts: int, seconds: float) -> None:
        """One decoding step: its round length, the drafts it verified (all
        requests), its seconds."""
        if self._round_length_of_last != round_length:
            self.verify.break_run()  # only steps of one round length differ by drafts alone
        self.verify.add(drafts, seconds)
        self._round_length_of_last = round_length
        normalized = seconds - self.verify.slope * (drafts - round_length)
        self.step_sum[round_length] = self.step_sum[round_length] * self.decay + normalized
        self.step_weight[round_length] = self.step_weight[round_length] * self.decay + 1.0

    def ready(self) -> bool:
        """At least two round lengths measured: enough to extrapolate."""
        return int((self.step_weight > 0).sum()) >= 2

    def current(self) -> StepCosts:
        measured = self.step_weight > 0
        lengths = np.arange(len(self.step_sum))
        means = np.where(measured, self.step_sum / np.maximum(self.step_weight, 1e-12), 0.0)
        known = lengths[measured]
        if len(known) == 0:
            steps = np.zeros(len(lengths))
        elif len(known) == 1:
            steps = np.full(len(lengths), means[known[0]])
        else:
            # Between measured lengths: interpolate; past them: the slope of
            # the two nearest, never less than the measured neighbour.
            steps = np.interp(lengths, known, means[known])
            low, high = known[:2], known[-2:]
            slope_low = max((means[low[1]] - means[low[0]]) / (low[1] - low[0]), 0.0)
            slope_high = max((means[high[1]] - means[high[0]]) / (high[1] - high[0]), 0.0)
            steps = np.where(lengths < known[0],
                             means[known[0]] - slope_low * (known[0] - lengths), steps)
            steps = np.where(lengths > known[-1],
                             means[known[-1]] + slope_high * (lengths - known[-1]), steps)
        # Drafting further never costs less: what says so is noise.
        steps = np.maximum.accumulate(np.maximum(steps, 0.0))
        return StepCosts(tuple(float(t) for t in steps), self.verify.slope)

