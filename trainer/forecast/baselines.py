"""Baselines a forecaster must beat: the last value, and linear AR(tau) by least squares.

Both are numpy-only and share one method with evaluate.py's torch path:
`k_step(values, origins, k_max)` -> [origins, k_max], row i holding x̂_{t+1}..x̂_{t+k_max}
made at t = origins[i] from values[: t + 1], feeding predictions back.
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
    """x̂_{t+k} = x_t for every k: the random-walk forecast."""

    name: str = "last-value"
    tau: int = 1

    def k_step(self, values: np.ndarray, origins: np.ndarray, k_max: int) -> np.ndarray:
        return np.repeat(values[origins][:, None], k_max, axis=1).astype(np.float32)


@dataclass
class LinearAR:
    """x̂_{t+1} = b + sum_j w_j x_{t-j}, j < tau, fitted by least squares on the train range."""

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
            raise SeriesError(f"too few training values ({len(train)}) to fit AR({tau})")
        x = _windows(train.astype(np.float64), tau, ends)  # [n, tau]
        design = np.concatenate([x, np.ones((len(ends), 1))], axis=1)  # [n, tau + 1]
        target = train[ends + 1].astype(np.float64)  # [n]
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        return cls(weights=coef[:tau], bias=float(coef[tau]))

    def k_step(self, values: np.ndarray, origins: np.ndarray, k_max: int) -> np.ndarray:
        if origins.min() < self.tau - 1:
            raise SeriesError(f"AR({self.tau}) needs {self.tau} values before its first origin")
        window = _windows(values.astype(np.float64), self.tau, origins)  # [n, tau]
        out = np.empty((len(origins), k_max))
        for k in range(k_max):  # loop over the horizon, vectorised over origins
            nxt = window @ self.weights + self.bias  # [n]
            out[:, k] = nxt
            window = np.concatenate([window[:, 1:], nxt[:, None]], axis=1)
        return out.astype(np.float32)
