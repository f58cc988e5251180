"""The engine's step costs, measured while it runs, as two decayed linear
fits: the target's step against the tokens it verifies, and the drafting
round against its draft forwards past the first (the first always runs: it
keeps the draft's cache current)."""

from __future__ import annotations

from dataclasses import dataclass


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
    """Seconds: a target step = target_base + per_verified_token * tokens;
    a drafting round = round_base + per_extra_forward * (forwards - 1)."""

    target_base: float
    per_verified_token: float
    round_base: float
    per_extra_forward: float


class MeasuredCosts:
    def __init__(self, decay: float = 0.9):
        self.target = DecayedLinearFit(decay)
        self.round = DecayedLinearFit(decay)

    def observe_target(self, verified_tokens: int, seconds: float) -> None:
        self.target.add(verified_tokens, seconds)

    def observe_round(self, forwards: int, seconds: float) -> None:
        self.round.add(max(forwards - 1, 0), seconds)

    def ready(self, min_samples: float = 2.0) -> bool:
        return self.target.samples >= min_samples and self.round.samples >= min_samples

    def current(self) -> StepCosts:
        return StepCosts(self.target.intercept, self.target.slope, self.round.intercept,
                         self.round.slope)
