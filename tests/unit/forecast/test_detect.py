"""Automatic season and differencing choices on synthetic and real series."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rnnserve.trainer.forecast.detect import (
    adf_statistic,
    candidate_representations,
    choose_representation,
    detect_season,
    needs_difference,
    seasonal_strength,
)
from rnnserve.trainer.forecast.representation import Representation
from rnnserve.trainer.forecast.series import load_csv

DATA = Path(__file__).resolve().parents[3] / "bench" / "data"


def test_season_of_a_noisy_monthly_pattern_is_12_and_noise_has_none() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(240)
    seasonal = 10 + 0.05 * t + np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.3, 240)
    assert detect_season(seasonal) == 12
    assert detect_season(rng.normal(size=240)) == 0
    assert detect_season(np.arange(10.0)) == 0  # too short to tell


def _persistent(seed: int, n: int = 160) -> np.ndarray:
    """AR(1) with coefficient 0.97 seen through noise: no season, a slowly decaying
    autocorrelation that wiggles (quarterly US inflation: 0.718, 0.700, 0.714 at lags 1-3)."""
    rng = np.random.default_rng(seed)
    shocks, x = rng.normal(size=n), np.zeros(n)
    for i in range(1, n):
        x[i] = 0.97 * x[i - 1] + shocks[i]
    return x + 2.0 * rng.normal(size=n)


def test_a_wiggle_in_a_persistent_series_autocorrelation_is_no_season() -> None:
    """Any local peak of the autocorrelation above 0.5 was a season: 15 of these 50 series
    got one (2 to 12), and quarterly US inflation got 3, which doubled the noise the models
    learned from. A season must now explain some variance (seasonal strength >= 0.1)."""
    seasons = [detect_season(_persistent(seed)) for seed in range(50)]
    assert sum(1 for season in seasons if season) <= 2, seasons


def test_monthly_data_with_strong_quarter_ends_has_a_season_of_12() -> None:
    """Orders that peak at every quarter's end, the year's the highest (Eurostat's
    electrical equipment orders): the autocorrelation peaks at 3 first, and season 3 was
    taken; the year explains much more of the variance."""
    t = np.arange(240)
    quarter_ends = np.array([0, 0, 3.0, 0, 0, 4, 0, 0, 3, 0, 0, 8])
    for seed in range(3):
        rng = np.random.default_rng(seed)
        orders = np.cumsum(rng.normal(0, 0.5, 240)) + quarter_ends[t % 12]
        orders += rng.normal(0, 0.5, 240)
        assert detect_season(orders) == 12
        assert seasonal_strength(orders, 12) > seasonal_strength(orders, 3) + 0.1
        # a pattern that repeats every 3 values keeps 3: its multiples explain no more
        quarterly = np.cumsum(rng.normal(0, 0.3, 240)) + np.array([0, 0, 2.0])[t % 3]
        assert detect_season(quarterly + rng.normal(0, 0.3, 240)) == 3


def test_seasonal_strength_is_near_0_for_noise_and_1_for_a_clean_season() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(240)
    assert abs(seasonal_strength(rng.normal(size=240), 12)) < 0.1
    clean = 0.05 * t + np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.01, 240)
    assert seasonal_strength(clean, 12) > 0.99


def test_a_pure_trend_has_no_season() -> None:
    """Detrending an exact line leaves only rounding noise, whose autocorrelation used to
    peak somewhere (lag 5 for 1e6 + 0.1 t) and turn a straight line into a season."""
    t = np.arange(300.0)
    for line in (3 * t + 5, 1e6 + 0.1 * t, 1e6 + t):
        assert detect_season(line) == 0
    assert choose_representation(1e6 + 0.1 * t, "level", None) == Representation(0, 0)


def test_unit_root_test_separates_a_random_walk_from_white_noise() -> None:
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(size=400))
    noise = rng.normal(size=400)
    assert adf_statistic(noise) < -3.5 and not needs_difference(noise)
    assert needs_difference(walk) and needs_difference(5 + 0.1 * np.arange(400) + noise)


def test_real_series_choices() -> None:
    co2 = load_csv(DATA / "co2.csv", "co2")
    assert detect_season(co2[:1800]) == 52
    assert choose_representation(co2[:1800], "auto", None).season == 52
    cpi = load_csv(DATA / "macro.csv", "cpi")
    assert choose_representation(cpi, "auto", None) == Representation(1, 0)
    elnino = load_csv(DATA / "elnino.csv", "temperature")
    assert choose_representation(elnino[:580], "auto", None).season == 12
    # flags win over detection
    assert choose_representation(cpi, "level", 0) == Representation(0, 0)
    assert choose_representation(cpi, "diff", 4) == Representation(1, 4)


def test_a_call_for_differences_keeps_levels_as_a_candidate() -> None:
    """The ADF test reads the Nile's 1898 level shift as a unit root; levels stay in play."""
    nile = load_csv(DATA / "nile.csv", "volume")
    assert needs_difference(nile[:64])
    assert candidate_representations(nile[:64], "auto", None) == [
        Representation(1, 0),
        Representation(0, 0),
    ]
    noise = np.random.default_rng(0).normal(size=200)
    assert candidate_representations(noise, "auto", None) == [Representation(0, 0)]
    # a choice the user made is final
    assert candidate_representations(nile[:64], "diff", None) == [Representation(1, 0)]
    assert candidate_representations(nile[:64], "level", 0) == [Representation(0, 0)]
