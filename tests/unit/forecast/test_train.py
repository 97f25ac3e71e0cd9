"""Training: loss goes down on the sine, bad settings give clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.forecast.evaluate import TorchForecaster
from rnnserve.trainer.forecast.models import build_model
from rnnserve.trainer.forecast.series import load_series
from rnnserve.trainer.forecast.train import (
    ORIGIN_STRIDE,
    ForecastTrainConfig,
    _loss,
    fit_forecaster,
    train_forecaster,
)


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
        ({"warmup": -1}, "--warmup must be at least 0"),  # was a RuntimeError from torch
        ({"patience": -1}, "--patience must be at least 0"),
    ],
)
def test_bad_settings_are_refused(changes: dict, message: str) -> None:
    series = load_series(None, None, tau=4)
    config = ForecastTrainConfig(arch="gru", epochs=1, num_steps=32, rollout=0)
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(TrainerError, match=message):
        train_forecaster(config, series)


def test_a_series_too_short_for_the_warm_up_asks_for_a_shorter_warm_up() -> None:
    # --num-steps auto is already 1: lowering it cannot help, a shorter warm-up can
    from rnnserve.trainer.forecast.series import tail_split

    values = load_series(None, None, tau=4).values[:20]
    series = tail_split(values, 4, "short", transform="level", season=0)  # trains on 15
    config = ForecastTrainConfig(arch="gru", hidden=4, epochs=1, num_steps=None)
    with pytest.raises(TrainerError, match="lower --warmup"):
        train_forecaster(config, series)
    train_forecaster(ForecastTrainConfig(arch="gru", hidden=4, epochs=1, num_steps=None,
                                         warmup=4), series)  # fmt: skip


@pytest.mark.parametrize("arch", ["mlp", "gru", "lstm"])
def test_multi_step_loss_is_the_k_step_error_of_the_evaluator(arch: str) -> None:
    """The rollout term trains exactly what evaluate.py scores: predictions fed back."""
    torch.manual_seed(0)
    model = build_model(arch, tau=3, hidden=5, layers=2 if arch != "mlp" else 1).eval()
    batch = torch.randn(2, 30)  # [b, warmup + steps + 1]
    warmup, rollout = 4, 6
    with torch.no_grad():
        one_step = _loss(model, batch, warmup, rollout=0)
        both = _loss(model, batch, warmup, rollout=rollout)
    origins = np.arange(warmup, 29 - rollout + 1, ORIGIN_STRIDE)
    errors = []
    for row in batch.numpy():
        preds = TorchForecaster(model).k_step(row, origins, rollout)  # [m, rollout]
        for i, o in enumerate(origins):
            errors += list(preds[i, 1:] - row[o + 2 : o + rollout + 1])
    assert float(both - one_step) == pytest.approx(float(np.mean(np.square(errors))), rel=1e-4)


def _tail_series():
    from rnnserve.trainer.forecast.series import tail_split

    values = load_series(None, None, tau=4).values[:400]
    return tail_split(values, 4, "sine", val_size=40, transform="level", season=0)


def test_early_stopping_restores_the_best_checked_weights() -> None:
    from rnnserve.trainer.forecast.train import EarlyStopping

    config = ForecastTrainConfig(arch="mlp", hidden=4, epochs=50, patience=2)
    stopper = EarlyStopping(_tail_series(), config)
    model = build_model("mlp", tau=4, hidden=4, layers=1)
    scores = iter([5.0, 3.0, 4.0, 4.5])
    stopper.score = lambda _model: next(scores)  # the tail scores of four checks
    stops = []
    for check in range(4):
        with torch.no_grad():
            model.net[0].bias.fill_(float(check))  # weights that tell the checks apart
        stops.append(stopper.should_stop(model, check))
    assert stops == [False, False, False, True]  # two checks without improvement
    assert stopper.best == 3.0 and stopper.best_epoch == 1
    stopper.restore(model)
    assert torch.all(model.net[0].bias == 1.0)


def test_refit_trains_on_the_whole_series_after_the_tail_chose_the_weights() -> None:
    from dataclasses import replace

    series = _tail_series()
    config = ForecastTrainConfig(
        arch="mlp", hidden=4, epochs=20, num_steps=32, rollout=0, patience=2, refit=False
    )
    model, history = train_forecaster(config, series)
    refit_model, refit_history = train_forecaster(replace(config, refit=True), series)
    assert len(refit_history) > len(history)  # the short pass over all 400 values
    assert not torch.allclose(refit_model.net[0].weight, model.net[0].weight)


def test_a_refit_of_one_epoch_is_said_in_the_singular(tmp_path, capsys) -> None:
    """A one-epoch refit printed "refit on all 200 values for 1 epochs"."""
    from rnnserve.trainer.forecast.series import tail_split

    values = load_series(None, None, tau=4).values[:200].astype(np.float64)
    series = tail_split(values, 4, "sine", val_size=20, transform="level", season=0)
    config = ForecastTrainConfig(arch="mlp", hidden=4, epochs=2, num_steps=16, rollout=0)
    fit_forecaster(config, series, progress=True)
    out = capsys.readouterr().out
    assert "refit on all 200 values for 1 epoch\n" in out, out
