"""Training: loss goes down on the sine, bad settings give clear errors."""

from __future__ import annotations

import pytest

from trainer.errors import TrainerError
from trainer.forecast.series import load_series
from trainer.forecast.train import ForecastTrainConfig, train_forecaster


@pytest.mark.parametrize(("arch", "rollout"), [("mlp", 0), ("gru", 4), ("lstm", 0)])
def test_tiny_training_lowers_the_loss(arch: str, rollout: int) -> None:
    series = load_series(None, None, tau=4)
    config = ForecastTrainConfig(
        arch=arch, hidden=8, epochs=15, num_steps=32, rollout=rollout, lr=0.02
    )
    model, history = train_forecaster(config, series)
    assert len(history) == 15
    assert min(history[-3:]) < history[0]
    assert not model.training


def test_training_is_reproducible_with_a_seed() -> None:
    series = load_series(None, None, tau=4)
    config = ForecastTrainConfig(arch="mlp", hidden=4, epochs=2, num_steps=16, rollout=0)
    assert train_forecaster(config, series)[1] == train_forecaster(config, series)[1]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_steps": 0}, "at least 1"),
        ({"rollout": 40}, "rollout must be between"),
        ({"num_steps": 700}, "lower --num-steps"),
        ({"arch": "hmm"}, "--arch must be one of"),
        ({"device": "tpu"}, "unknown --device"),
    ],
)
def test_bad_settings_are_refused(changes: dict, message: str) -> None:
    series = load_series(None, None, tau=4)
    config = ForecastTrainConfig(arch="gru", epochs=1, num_steps=32, rollout=0)
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(TrainerError, match=message):
        train_forecaster(config, series)
