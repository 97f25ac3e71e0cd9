"""The baselines forecasters report: naive, seasonal naive, drift, least-squares AR(tau).

All are numpy-only, work in the series' own units and share one method with
evaluate.py's model adapter: `k_step(values, origins, k_max)` -> [origins, k_max], row i
holding x̂_{t+1}..x̂_{t+k_max} made at t = origins[i] from values[: t + 1] only.
Definitions as in Hyndman & Athanasopoulos, *Forecasting: Principles and Practice*, 5.2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnnserve.trainer.forecast.series import SeriesError


def _windows(values: np.ndarray, tau: int, ends: np.ndarray) -> np.ndarray:
    """Rows values[t - tau + 1 .. t] for every t in ends: [len(ends), tau]."""
    offsets = np.arange(-tau + 1, 1)
    return values[ends[:, None] + offsets[None, :]]


@dataclass
class LastValue:
    """Naive: x̂_{t+k} = x_t for every k (the random-walk forecast)."""

    name: str = "naive"
    tau: int = 1

    def k_step(self, values: np.ndarray, origins: np.ndarray, k_max: int) -> np.ndarray:
        return np.repeat(np.asarray(values, np.float64)[origins][:, None], k_max, axis=1)


@dataclass
class SeasonalNaive:
    """x̂_{t+k} = x_{t+k-m(floor((k-1)/m)+1)}: the value one season (or more) earlier."""

    season: int
    name: str = "seasonal-naive"

    @property
    def tau(self) -> int:
        return max(1, self.season)

    def k_step(self, values: np.ndarray, origins: np.ndarray, k_max: int) -> np.ndarray:
        m = max(1, self.season)
        k = np.arange(1, k_max + 1)
        back = k - m * ((k - 1) // m + 1)  # in [-m + 1, 0]
        return np.asarray(values, np.float64)[origins[:, None] + back[None, :]]


@dataclass
class Drift:
    """x̂_{t+k} = x_t + k (x_t - x_0) / t: the line through the first and last observation."""

    name: str = "drift"
    tau: int = 2

    def k_step(self, values: np.ndarray, origins: np.ndarray, k_max: int) -> np.ndarray:
        x = np.asarray(values, np.float64)
        slope = (x[origins] - x[0]) / np.maximum(origins, 1)
        return x[origins][:, None] + slope[:, None] * np.arange(1, k_max + 1)[None, :]


@dataclass
class LinearAR:
    """x̂_{t+1} = b + sum_j w_j x_{t-j}, j < tau, fitted by least squares on the levels of the
    training range; k-step forecasts feed predictions back."""

    weights: np.ndarray  # [tau], weights[j] multiplies x_{t - tau + 1 + j}
    bias: float
    name: str = "linear-ar"

    @property
    def tau(self) -> int:
        return len(self.weights)

    @classmethod
    def fit(cls, train: np.ndarray, tau: int) -> LinearAR:
        """Least squares over every window inside `train` (float [T_train])."""
        ends = np.arange(tau - 1, len(train) - 1)
        if len(ends) < tau + 1:
            raise SeriesError(
                f"too few training values ({len(train)}) to fit AR({tau}): least squares "
                f"needs at least {2 * tau + 1} (lower --tau)"
            )
        x = _windows(train.astype(np.float64), tau, ends)  # [n, tau]
        design = np.concatenate([x, np.ones((len(ends), 1))], axis=1)  # [n, tau + 1]
        target = train[ends + 1].astype(np.float64)  # [n]
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        return cls(weights=coef[:tau], bias=float(coef[tau]))

    def k_step(self, values: np.ndarray, origins: np.ndarray, k_max: int) -> np.ndarray:
        if origins.min() < self.tau - 1:
            raise SeriesError(f"AR({self.tau}) needs {self.tau} values before its first origin")
        window = _windows(np.asarray(values, np.float64), self.tau, origins)  # [n, tau]
        out = np.empty((len(origins), k_max))
        for k in range(k_max):  # loop over the horizon, vectorised over origins
            nxt = window @ self.weights + self.bias  # [n]
            out[:, k] = nxt
            window = np.concatenate([window[:, 1:], nxt[:, None]], axis=1)
        return out


def all_baselines(train: np.ndarray, tau: int, season: int) -> list:
    """Naive, seasonal naive (when a season is known), drift and AR(tau) fitted on `train`."""
    found: list = [LastValue()]
    if season >= 2:
        found.append(SeasonalNaive(season))
    return [*found, Drift(), LinearAR.fit(np.asarray(train, np.float64), tau)]
