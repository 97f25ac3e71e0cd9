"""Forecast: normalise the history, warm up on it, then feed predictions back `horizon` times.

The graph maps normalised values [batch, time, 1] to the prediction of the next value. One
call over the whole history warms the state up and gives the one-step-ahead fitted values
(valid from index tau: before it the model's window is not full); each further call feeds
the last prediction back. Every value returned is in the series' original units.
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


@dataclass(frozen=True)
class Series:
    mean: float
    std: float
    tau: int

    @classmethod
    def from_manifest(cls, series: dict | None) -> Series:
        try:
            s = series or {}
            std = float(s.get("std", 1.0)) or 1.0
            return cls(float(s.get("mean", 0.0)), std, max(1, int(s.get("tau", 1))))
        except (TypeError, ValueError) as exc:
            raise UnsupportedTask(f"model has an unusable `series` entry: {exc}") from exc


def validate(history: list[float], horizon: int, tau: int, settings: Settings) -> None:
    if not history:
        raise BadRequest("history", "is empty")
    if len(history) < tau:
        raise BadRequest(
            "history",
            f"has {len(history)} values; this model needs at least {tau} (its window tau)",
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
    z = (np.asarray(history, dtype=np.float64) - series.mean) / series.std
    fitted, out = await runtime.call(_forecast_sync, entry.model, z, horizon)
    result = ForecastResult(forecast=(out * series.std + series.mean).tolist())
    if return_fitted:
        # fitted[t] predicts history[t + 1]; valid once the window is full (t >= tau - 1)
        result.fitted = (fitted[series.tau - 1 : -1] * series.std + series.mean).tolist()
        result.fitted_offset = series.tau
    return result
