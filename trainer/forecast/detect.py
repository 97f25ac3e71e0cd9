"""Automatic choices for `--season auto` and `--transform auto`, from the training range.

- Season: the autocorrelation of the linearly detrended series proposes the periods: lags
  that are a local maximum with autocorrelation >= SEASON_MIN_ACF, searched up to a third of
  the series (at least three periods must be seen). The smallest one whose seasonal strength
  (`seasonal_strength`: the share of variance that phase means explain around a moving
  average, FPP3 4.3) reaches MIN_SEASONAL_STRENGTH is the season, unless a multiple of it is
  stronger by STRONGER_MULTIPLE: then the strongest such multiple is. Weekly CO2 gives 52,
  monthly sea temperatures 12; a strong cycle (sunspots, ~11 years) is found too and treated
  the same way. The strength test drops the wiggle of a persistent series' autocorrelation
  (quarterly US inflation peaks at lag 3 by 0.015: strength 0), and the multiple finds the
  year of monthly data whose quarter-ends stand out (Eurostat's electrical equipment orders
  peak at 3, 6 and 12: strength 0.75 at 3, 0.91 at 12; season 3 left the models 4 to 8 times
  the one-step MSE they have with 12).
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
MIN_SEASONAL_STRENGTH = 0.1  # sunspots' irregular cycle: 0.24; a persistent series: about 0
STRONGER_MULTIPLE = 0.1  # a longer period must explain this much more (orders: +0.15 at 12)
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
    peaks = [  # local maxima of the autocorrelation: the candidate periods, shortest first
        lag
        for lag in range(2, limit + 1)
        if acf[lag - 1] >= SEASON_MIN_ACF and acf[lag - 2] < acf[lag - 1] >= acf[lag]
    ]
    for period in peaks:
        strength = seasonal_strength(x, period)
        if strength >= MIN_SEASONAL_STRENGTH:
            break
    else:
        return 0
    best, best_strength = period, strength
    # a multiple needs four periods, so that its means (after the moving average's trim of
    # one period) average three values each
    for multiple in range(2 * period, min(limit, n // 4) + 1, period):
        here = seasonal_strength(x, multiple)
        if here >= strength + STRONGER_MULTIPLE and here > best_strength:
            best, best_strength = multiple, here
    return best


def seasonal_strength(values: np.ndarray, period: int) -> float:
    """1 - Var(remainder) / Var(detrended), both with degrees of freedom: the share of the
    variance around a centred moving average of `period` values (2 x period when even) that
    the mean of each phase explains. Hyndman & Athanasopoulos' strength of seasonality (FPP3
    4.3) on a classical decomposition; the moving average follows a level that moves
    (a crash, a cycle), which a straight line does not. About 0 without a season."""
    x = np.asarray(values, dtype=np.float64)
    if period % 2:
        weights = np.full(period, 1.0 / period)
    else:
        weights = np.r_[0.5, np.ones(period - 1), 0.5] / period
    trend = np.convolve(x, weights, mode="valid")
    offset = len(weights) // 2
    detrended = x[offset : offset + len(trend)] - trend
    m = len(detrended)
    if m <= period:
        return 0.0
    phase = (np.arange(m) + offset) % period
    means = np.bincount(phase, detrended, period) / np.maximum(np.bincount(phase), 1)
    remainder = detrended - means[phase]
    centred = detrended - detrended.mean()
    total = float(centred @ centred) / (m - 1)
    if total <= 0:
        return 0.0
    return 1.0 - float(remainder @ remainder) / (m - period) / total


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
