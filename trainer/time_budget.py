"""A wall-clock budget for training: no epoch starts that the budget cannot hold.

Why: the default recipe promises a run of a few minutes on a small CPU; on a slower or busy
machine the same epochs would take longer, so the run ends after the last epoch that fits
(predicted from the slowest epoch so far) and ends as usual (weights averaged, exported).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

NO_LIMIT = 1 << 30


def further_epochs(budget: float, elapsed: float, slowest_epoch: float) -> int:
    """How many more epochs fit in `budget` seconds after `elapsed`, each as slow as the
    slowest so far; NO_LIMIT without a budget (budget <= 0) or with an infinite one (a
    quotient too large for an int would raise OverflowError after the epoch, not stop)."""
    if budget <= 0 or math.isinf(budget):
        return NO_LIMIT
    left = budget - elapsed
    if left < slowest_epoch or left <= 0:
        return 0
    fit = left / slowest_epoch if slowest_epoch > 0 else math.inf
    return NO_LIMIT if fit >= NO_LIMIT else math.floor(fit)


def scaled_average_from(average_from: int, epochs: int, last_epoch: int) -> int:
    """The first averaged epoch when a run planned for `epochs` ends at `last_epoch`: the
    same fraction of the (shorter) run is averaged. 0 stays 0 (no averaging)."""
    if not average_from or last_epoch >= epochs:
        return average_from
    averaged = max(1, round((epochs - average_from + 1) * last_epoch / epochs))
    return last_epoch - averaged + 1


def decay_steps(epoch: int, epochs: int, last_epoch: int) -> float:
    """How many per-epoch learning-rate decays epoch `epoch` gets (lr * decay ** this) when a
    run planned for `epochs` is expected to end at `last_epoch`: the schedule is stretched
    over the epochs that fit, so a run the budget cuts still ends at the planned lowest lr
    (budget-aware schedules beat truncated ones: Li et al., "Budgeted Training", ICLR 2020)
    rather than at a high one. Epoch 1 always has 0; no cut, no change: epoch - 1."""
    if not 1 < last_epoch < epochs:
        return float(epoch - 1)
    return min(epoch - 1, last_epoch - 1) * (epochs - 1) / (last_epoch - 1)


class TimeBudget:
    """Measures the run and its epochs; `clock` is injectable for tests."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.started = clock()
        self.slowest_epoch = 0.0
        self._epoch_started = self.started

    def epoch_started(self) -> None:
        self._epoch_started = self.clock()

    def epoch_ended(self) -> None:
        self.slowest_epoch = max(self.slowest_epoch, self.clock() - self._epoch_started)

    def elapsed(self) -> float:
        return self.clock() - self.started
