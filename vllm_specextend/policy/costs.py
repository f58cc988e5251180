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
Every step ages every length's mean alike (a mean itself moves only when
its length is measured), so a length measured again after a long while
takes its new cost nearly whole, not averaged with what it cost under
other conditions (the first rounds, another context); the policy measures
a length that has gone unmeasured too long again (`stale`).

Costs depend on the batch's context: the draft reads it whole where it
fits the draft's window, and the target's attention grows with it. So
they are kept per context octave (`CostsByContext`), each with its own
warm-up; a context whose octave has not warmed up yet borrows the costs
of one measured at nearly its length (a request growing past an octave's
edge does not warm up again).
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
        self.steps = 0
        # The step at which each round length was last measured (or asked for).
        self.measured_at = np.full(max_drafts + 1, -1)
        self._round_length_of_last = None
        self.warmup_rounds_done = 0
        self._context_sum = self._context_weight = 0.0
        self._current: StepCosts | None = None  # what `current` says until a step is observed

    def observe_step(self, round_length: int, drafts: int, seconds: float,
                     context_tokens: int = 0) -> None:
        """One decoding step: its round length, the drafts it verified (all
        requests), its seconds, the batch's context."""
        self._context_sum = self._context_sum * self.decay + context_tokens
        self._context_weight = self._context_weight * self.decay + 1.0
        if self._round_length_of_last != round_length:
            self.verify.break_run()  # only steps of one round length differ by drafts alone
        self.verify.add(drafts, seconds)
        self._round_length_of_last = round_length
        normalized = seconds - self.verify.slope * (drafts - round_length)
        self.step_sum *= self.decay
        self.step_weight *= self.decay
        self.step_sum[round_length] += normalized
        self.step_weight[round_length] += 1.0
        self.steps += 1
        self.measured_at[round_length] = self.steps
        self._current = None

    def stale(self, round_length: int, horizon: int) -> bool:
        """Whether `round_length` went unmeasured over the last `horizon`
        steps (it may never have been)."""
        return self.steps - self.measured_at[round_length] > horizon

    def not_drafting_suspect(self) -> bool:
        """Whether the cost of not drafting, S(0), is unmeasured or measured
        no cheaper than a round that drafted. Drafting never costs nothing
        (a draft forward, a verified token), so one of the two is wrong;
        while the policy drafts, only S(0) is never measured again, and an
        S(0) measured high once (a slow step in the warm-up) makes every
        round length look free."""
        measured, means = self._measured_means()
        if not measured[0]:
            return True
        return bool((means[1:][measured[1:]] <= means[0]).any())

    def measuring(self, round_length: int) -> None:
        """A round of `round_length` runs to measure it: not stale while its
        cost is on its way (read a step or two later)."""
        self.measured_at[round_length] = self.steps

    def ready(self) -> bool:
        """At least two round lengths measured: enough to extrapolate."""
        return int((self.step_weight > 0).sum()) >= 2

    def warmed_up(self, warmup_rounds: int) -> bool:
        return self.warmup_rounds_done >= warmup_rounds and self.ready()

    @property
    def context_tokens(self) -> float:
        """The (decayed) mean context these costs were measured at."""
        return self._context_sum / max(self._context_weight, 1e-12)

    def current(self) -> StepCosts:
        """Each round length's cost (asked every round, computed once a step)."""
        if self._current is None:
            self._current = self._estimate()
        return self._current

    def _measured_means(self) -> tuple[np.ndarray, np.ndarray]:
        """Which round lengths were measured, and each one's decayed mean
        (0 where not)."""
        measured = self.step_weight > 0
        return measured, np.where(measured,
                                  self.step_sum / np.maximum(self.step_weight, 1e-12), 0.0)

    def _estimate(self) -> StepCosts:
        measured, means = self._measured_means()
        lengths = np.arange(len(self.step_sum))
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



class CostsByContext:
    """`MeasuredCosts` per octave of the batch's context (its requests'
    tokens, summed). An octave measures its costs after its own warm-up;
    until then a context borrows the costs of a warmed-up octave measured
    within `BORROW_RATIO` of its length, and, borrowing, refines them."""

    MIN_OCTAVE = 8  # contexts under 256 tokens share one octave
    BORROW_RATIO = 1.5

    def __init__(self, max_drafts: int, decay: float, warmup_rounds: int):
        self.max_drafts = max_drafts
        self.decay = decay
        self.warmup_rounds = warmup_rounds
        self.by_octave: dict[int, MeasuredCosts] = {}

    def own(self, context_tokens: int) -> MeasuredCosts:
        octave = max(int(context_tokens).bit_length() - 1, self.MIN_OCTAVE)
        if octave not in self.by_octave:
            self.by_octave[octave] = MeasuredCosts(self.max_drafts, self.decay)
        return self.by_octave[octave]

    def warmed_up(self, context_tokens: int) -> MeasuredCosts | None:
        """The costs a context is priced at: its octave's once warmed up,
        else the nearest warmed-up octave's close enough to borrow; None:
        the context's octave warms up first."""
        own = self.own(context_tokens)
        if own.warmed_up(self.warmup_rounds):
            return own
        context = max(context_tokens, 1)
        ratios = {abs(np.log(max(costs.context_tokens, 1.0) / context)): costs
                  for costs in self.by_octave.values()
                  if costs.warmed_up(self.warmup_rounds)}
        nearest = min(ratios, default=None)
        if nearest is None or nearest > np.log(self.BORROW_RATIO):
            return None
        return ratios[nearest]

    def priced_at(self, context_tokens: int) -> MeasuredCosts:
        """Where a step of this context is measured: the costs it was priced
        at, or its own octave's while that warms up."""
        return self.warmed_up(context_tokens) or self.own(context_tokens)
