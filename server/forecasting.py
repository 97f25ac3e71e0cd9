"""Forecast: represent and normalise the history, warm up on it, feed predictions back
`horizon` times, and undo the representation.

The graph maps the normalised representation [batch, time, 1] (levels, or first and/or
seasonal differences: manifest.series.representation, docs/forecasting.md) to its next
value. One call over the whole history warms the state up and gives the one-step-ahead
fitted values (valid from index tau: before it the window or the differences are not
full); each further call feeds the last prediction back. Predicted differences are added
back onto the history (x̂_{t+j} = x̂_{t+j-m} + ŷ_{t+j}, ŷ accumulated from y_t), so every
value returned is in the series' original units, with the manifest's residual intervals.
This is the inverse of trainer/forecast/representation.py; a unit test holds them equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rnnserve.server.errors import BadRequest, UnsupportedTask
from rnnserve.server.repository import ModelVersion
from rnnserve.server.runtime import OnnxModel, Runtime
from rnnserve.server.settings import Settings


@dataclass
class ForecastResult:
    forecast: list[float]
    fitted: list[float] = field(default_factory=list)
    fitted_offset: int = 0
    # central interval per forecast step (manifest.series.intervals), empty without one
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Series:
    """manifest.series: normalisation, min history, representation and intervals.
    Manifests written before representations existed read as levels (difference 0)."""

    mean: float
    std: float
    tau: int
    difference: int = 0
    season: int = 0
    lower: tuple[float, ...] = ()
    upper: tuple[float, ...] = ()

    @property
    def lost(self) -> int:
        return self.season + self.difference

    @classmethod
    def from_manifest(cls, series: dict | None) -> Series:
        try:
            s = series or {}
            std = float(s.get("std", 1.0)) or 1.0
            rep = s.get("representation") or {}
            difference, season = int(rep.get("difference", 0)), int(rep.get("season", 0))
            if difference not in (0, 1) or season < 0 or season == 1:
                raise ValueError(f"representation {rep} is not one this server can undo")
            intervals = s.get("intervals") or {}
            lower = tuple(float(v) for v in intervals.get("lower") or ())
            upper = tuple(float(v) for v in intervals.get("upper") or ())
            if len(lower) != len(upper):
                raise ValueError("intervals.lower and intervals.upper differ in length")
            mean = float(s.get("mean", 0.0))
            # a NaN/inf here turned every request into "history[0] is too far from the
            # series", an INVALID_ARGUMENT blaming the caller for the package's fault
            if not all(math.isfinite(v) for v in (mean, std, *lower, *upper)):
                raise ValueError("mean, std and intervals must be finite numbers")
            tau = max(1, int(s.get("tau", 1)), season + difference + 1)
            return cls(mean, std, tau, difference, season, lower, upper)
        except (TypeError, ValueError, AttributeError) as exc:
            raise UnsupportedTask(f"model has an unusable `series` entry: {exc}") from exc

    def represent(self, history: np.ndarray) -> np.ndarray:
        """Normalised representation of the levels [T]; 0 where it is undefined."""
        y = history.astype(np.float64).copy()
        m = self.season
        if m:
            y[m:] = history[m:] - history[:-m]
        if self.difference:
            y[1:] = y[1:] - y[:-1]
        z = (y - self.mean) / self.std
        z[: self.lost] = 0.0
        return z

    def levels(self, history: np.ndarray, origins: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Levels [n, K] from normalised predictions z [n, K] made at `origins` [n]."""
        r = z * self.std + self.mean
        m = self.season
        if not self.lost:
            return r
        y = r
        if self.difference:
            y_now = history[origins] - (history[origins - m] if m else 0.0)
            y = y_now[:, None] + np.cumsum(r, axis=1)
        if not m:
            return y
        out = np.empty_like(y)
        for j in range(y.shape[1]):
            out[:, j] = (history[origins - m + 1 + j] if j < m else out[:, j - m]) + y[:, j]
        return out

    def interval(self, forecast: np.ndarray) -> tuple[list[float], list[float]]:
        """[x̂_k + lower[k-1], x̂_k + upper[k-1]] per step; the last entry beyond its end.
        Offsets are widened to 0 (as the trainer writes them since), so an older manifest
        from a biased model still gives lower <= forecast <= upper."""
        if not self.lower:
            return [], []
        idx = np.minimum(np.arange(len(forecast)), len(self.lower) - 1)
        lo = np.minimum(np.asarray(self.lower)[idx], 0.0)
        hi = np.maximum(np.asarray(self.upper)[idx], 0.0)
        return (forecast + lo).tolist(), (forecast + hi).tolist()


def validate(history: list[float], horizon: int, tau: int, settings: Settings) -> None:
    if not history:
        raise BadRequest("history", "is empty")
    if len(history) < tau:
        raise BadRequest(
            "history",
            f"has {len(history)} values; this model needs at least {tau} "
            "(its window tau, plus the values its differencing uses)",
        )
    if len(history) > settings.max_history:
        raise BadRequest(
            "history", f"has {len(history)} values, more than the limit {settings.max_history}"
        )
    for i, v in enumerate(history):
        if not math.isfinite(v):
            raise BadRequest(f"history[{i}]", f"must be a finite number, got {v}")
    if not 1 <= horizon <= settings.max_horizon:
        raise BadRequest("horizon", f"must be in [1, {settings.max_horizon}], got {horizon}")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _forecast_sync(model: OnnxModel, z: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Worker thread: z [time] normalised -> (one-step predictions [time], forecast [horizon])."""
    x = z.astype(np.float32).reshape(1, -1, 1)  # [1, time, 1]
    pred, state = model.run(x, model.initial_state(1))  # [1, time, 1]
    fitted = pred[0, :, 0].astype(np.float64)
    out = np.empty(horizon, dtype=np.float64)
    out[0] = fitted[-1]
    step = pred[:, -1:, :]  # [1, 1, 1]
    for k in range(1, horizon):
        step, state = model.run(step.astype(np.float32), state)
        out[k] = step[0, -1, 0]
    return fitted, out


async def forecast(
    entry: ModelVersion,
    runtime: Runtime,
    settings: Settings,
    history: list[float],
    horizon: int,
    return_fitted: bool,
) -> ForecastResult:
    assert entry.manifest is not None and entry.model is not None
    series = Series.from_manifest(entry.manifest.series)
    validate(history, horizon, series.tau, settings)
    levels = np.asarray(history, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        z = series.represent(levels)
        outside = np.flatnonzero(~np.isfinite(z) | (np.abs(z) > FLOAT32_MAX))
    if outside.size:  # finite in float64, yet no float32 graph can take it (1e308)
        i = int(outside[0])
        raise BadRequest(
            f"history[{i}]", f"{history[i]} is too far from the series the model learned"
        )
    fitted, out = await runtime.call(_forecast_sync, entry.model, z, horizon)
    last = np.array([len(levels) - 1])
    with np.errstate(over="ignore", invalid="ignore"):
        forecast_levels = series.levels(levels, last, out[None, :])[0]
        lower, upper = series.interval(forecast_levels)
        one_step = np.empty(0)
        if return_fitted:
            # fitted[t] predicts history[t + 1]; valid once the window is full (t >= tau - 1)
            origins = np.arange(series.tau - 1, len(levels) - 1)
            one_step = series.levels(levels, origins, fitted[origins][:, None])[:, 0]
    _require_finite(forecast_levels, lower, upper, one_step)
    result = ForecastResult(forecast=forecast_levels.tolist(), lower=lower, upper=upper)
    if return_fitted:
        result.fitted = one_step.tolist()
        result.fitted_offset = series.tau
    return result


def _require_finite(*values: np.ndarray | list[float]) -> None:
    """A history the float32 graph takes can still overflow inside it (an MLP's weighted
    sum of values near 3e38) or when the levels are rebuilt: refuse it rather than answer
    OK with inf and NaN."""
    if not all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in values):
        raise BadRequest(
            "history",
            "is too far from the series the model learned: its forecast overflowed",
        )
