"""Automatic choices for `--season auto` and `--transform auto`, from the training range.

- Season: the autocorrelation of the linearly detrended series; the season is the smallest
  lag that is a local maximum with autocorrelation >= SEASON_MIN_ACF, searched up to a third
  of the series (at least three periods must be seen). Weekly CO2 gives 52, monthly sea
  temperatures 12; a strong cycle (sunspots, ~11 years) is found too and treated the same way.
- Difference: the augmented Dickey-Fuller test with a constant on the (seasonally
  differenced) series; when its statistic does not reject a unit root at 5 % (MacKinnon's
  asymptotic critical value -2.86), the model learns first differences. The test reads a
  level shift or a short sample as a unit root (Perron 1989: a broken mean looks like a
  random walk to it), so when it calls for differences, levels stay a candidate and the
  validation tail decides between them (`candidate_representations`, select.py).
"""

from __future__ import annotations

import numpy as np

from rnnserve.trainer.forecast.representation import Representation

SEASON_MIN_ACF = 0.5
ADF_CRITICAL_5PCT = -2.86  # constant, no trend; MacKinnon (2010), asymptotic
MIN_VALUES_FOR_TESTS = 20
FLAT_RESIDUAL = 1e-9  # detrended std at most this fraction of max |x|: rounding noise only


def autocorrelation(values: np.ndarray, max_lag: int) -> np.ndarray:
    """acf[l - 1] for lags l = 1..max_lag (biased estimator, as statsmodels' default)."""
    x = np.asarray(values, dtype=np.float64)
    x = x - x.mean()
    denom = float(x @ x) or 1.0
    return np.array([float(x[:-lag] @ x[lag:]) / denom for lag in range(1, max_lag + 1)])


def detect_season(values: np.ndarray, max_period: int | None = None) -> int:
    """The seasonal period of `values` (0 when none is clear)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    limit = min(max_period or n // 3, n // 3)
    if n < MIN_VALUES_FOR_TESTS or limit < 3:
        return 0
    t = np.arange(n)
    detrended = x - np.polyval(np.polyfit(t, x, 1), t)
    if np.std(detrended) <= FLAT_RESIDUAL * np.max(np.abs(x)):
        return 0  # a straight line: the residual's autocorrelation would be rounding noise
    acf = autocorrelation(detrended, limit + 1)
    for lag in range(2, limit + 1):
        here = acf[lag - 1]
        if here >= SEASON_MIN_ACF and here > acf[lag - 2] and here >= acf[lag]:
            return lag
    return 0


def adf_statistic(values: np.ndarray) -> float:
    """t-statistic of rho in  dx_t = a + rho x_{t-1} + sum_j b_j dx_{t-j} + e_t
    (lags: Schwert's 12 (n/100)^(1/4), at most n/5)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    lags = min(int(12 * (n / 100) ** 0.25), max(0, n // 5))
    dx = np.diff(x)
    rows = np.arange(lags, len(dx))
    columns = [x[rows], np.ones(len(rows))] + [dx[rows - j] for j in range(1, lags + 1)]
    design = np.stack(columns, axis=1)
    target = dx[rows]
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    resid = target - design @ coef
    dof = max(1, len(target) - design.shape[1])
    cov = (resid @ resid / dof) * np.linalg.pinv(design.T @ design)
    return float(coef[0] / np.sqrt(max(cov[0, 0], 1e-300)))


def needs_difference(values: np.ndarray) -> bool:
    """True when the ADF test cannot reject a unit root (a trend or a wandering level)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) < MIN_VALUES_FOR_TESTS or np.ptp(x) == 0:
        return False
    return adf_statistic(x) > ADF_CRITICAL_5PCT


def choose_representation(train: np.ndarray, transform: str, season: int | None) -> Representation:
    """The representation for flags `--transform` (auto | level | diff) and `--season`
    (None = auto, 0 = none, m >= 2), decided on the training range only."""
    period = detect_season(train) if season is None else season
    seasonal = Representation(0, period)
    if transform == "level":
        return seasonal
    if transform == "diff":
        return Representation(1, period)
    return Representation(int(needs_difference(seasonal.apply(train))), period)


def candidate_representations(
    train: np.ndarray, transform: str, season: int | None
) -> list[Representation]:
    """The representations worth training, the automatic choice first: with `--transform
    auto`, a call for differences keeps levels as a second candidate (the ADF test cannot
    tell a unit root from a level shift); any other choice is final."""
    chosen = choose_representation(train, transform, season)
    if transform != "auto" or not chosen.difference:
        return [chosen]
    return [chosen, Representation(0, chosen.season)]
