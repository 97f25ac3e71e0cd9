"""The validation tail chooses between differences and levels (select.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rnnserve.trainer.forecast.select import train_on_best_representation
from rnnserve.trainer.forecast.series import tail_candidates
from rnnserve.trainer.forecast.train import ForecastTrainConfig

CONFIG = ForecastTrainConfig(arch="mlp", tau=4, hidden=8, epochs=40, num_steps=None, seed=0)


def _choose(values: np.ndarray) -> tuple[str, dict[str, float]]:
    candidates = tail_candidates(values, 4, "synthetic", val_size=24)
    assert [c.representation.name for c in candidates] == ["diff", "level"]
    picked = train_on_best_representation(CONFIG, candidates, log=lambda _: None)
    return picked.series.representation.name, picked.val_scores


def test_a_level_shift_keeps_levels_and_a_trend_keeps_differences() -> None:
    rng = np.random.default_rng(0)
    shifted = np.concatenate([np.full(40, 10.0), np.full(120, 7.0)]) + rng.normal(0, 1, 160)
    name, scores = _choose(shifted)  # white noise around a mean that moved once
    assert name == "level" and scores["level"] < scores["diff"]
    trend = 0.5 * np.arange(160) + rng.normal(0, 1, 160)  # leaves the range it trained on
    name, scores = _choose(trend)
    assert name == "diff" and scores["diff"] < scores["level"]
    assert all(math.isfinite(v) for v in scores.values())


def test_one_candidate_trains_once_and_an_empty_list_is_refused() -> None:
    values = np.sin(0.3 * np.arange(120)) + np.random.default_rng(1).normal(0, 0.1, 120)
    (only,) = tail_candidates(values, 4, "sine", val_size=16, transform="level", season=0)
    picked = train_on_best_representation(CONFIG, [only], log=lambda _: None)
    assert picked.series is only and list(picked.val_scores) == ["level"]
    with pytest.raises(ValueError):
        train_on_best_representation(CONFIG, [], log=lambda _: None)
