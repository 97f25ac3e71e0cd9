"""k-step evaluation: the batched torch path equals a naive per-origin loop; MSE in series units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnserve.trainer.forecast.evaluate import (
    TorchForecaster,
    evaluate_all,
    format_table,
    metrics_for_manifest,
    mse_by_horizon,
    predict,
)
from rnnserve.trainer.forecast.models import LatentForecaster, WindowMLP
from rnnserve.trainer.forecast.series import split_series, textbook_series


def naive_k_step(model, values: np.ndarray, origin: int, k: int) -> list[float]:
    """Warm up on values[: origin + 1] in one call, then feed predictions back one by one."""
    with torch.no_grad():
        history = torch.as_tensor(values[: origin + 1]).view(1, -1, 1)
        out, *state = model(history, *model.initial_state(1))
        preds = [out[:, -1:]]
        for _ in range(k - 1):
            out, *state = model(preds[-1], *state)
            preds.append(out)
    return [float(p) for p in preds]


@pytest.mark.parametrize(
    "model",
    [WindowMLP(tau=3, hidden=4), LatentForecaster("gru", hidden=5, layers=2)],
    ids=["mlp", "gru2"],
)
def test_batched_k_step_equals_naive_loop(model) -> None:
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model.eval()
    values = np.random.default_rng(0).normal(size=40).astype(np.float32)
    origins = np.array([2, 3, 17, 30])
    out = TorchForecaster(model).k_step(values, origins, 6)
    assert out.shape == (4, 6)
    for i, t in enumerate(origins):
        assert np.allclose(out[i], naive_k_step(model, values, int(t), 6), atol=1e-5)


class Oracle:
    """Predicts the true future (series units) plus a constant offset."""

    tau = 1

    def __init__(self, name: str, offset: float) -> None:
        self.name, self.offset = name, offset

    def k_step(self, values, origins, k_max):
        padded = np.concatenate([values, np.zeros(k_max, dtype=np.float32)])
        idx = origins[:, None] + np.arange(1, k_max + 1)[None, :]
        return padded[idx] + self.offset


def test_mse_is_over_the_test_range_in_series_units() -> None:
    series = split_series(textbook_series(), 4, "textbook")
    table, results = evaluate_all([Oracle("exact", 0.0), Oracle("off", 0.5)], series)
    assert set(table) == {"exact", "off"}
    for k in (1, 4, 16, 64):
        assert table["exact"][k] == pytest.approx(0.0, abs=1e-10)
        # predictors answer in series units: an offset of 0.5 costs 0.25 in MSE
        assert table["off"][k] == pytest.approx(0.25, rel=1e-6)
    targets, _ = results[0].at_horizon(64)
    assert targets.min() <= series.num_train  # every test target is covered at k = 64
    assert metrics_for_manifest(table["off"]).keys() == {"mse_k1", "mse_k4", "mse_k16", "mse_k64"}
    text = format_table(table)
    assert "k=16" in text and text.splitlines()[2].startswith("off")


def test_mse_skips_targets_outside_the_test_range() -> None:
    series = split_series(textbook_series(), 4, "textbook")
    result = predict(Oracle("x", 0.0), series, 4, first_origin=3)
    result.predictions[: series.num_train - 8] += 10.0  # only training-range targets wrong
    assert mse_by_horizon(result, series, (1, 4))[1] == pytest.approx(0.0, abs=1e-10)


def test_manifest_metrics_leave_out_horizons_without_targets() -> None:
    # JSON has no NaN: a horizon no held-out target reaches is left out, not written as NaN
    row = {1: 0.5, 4: 0.7, 16: float("nan"), 64: float("nan")}
    assert metrics_for_manifest(row, "mase") == {"mase_k1": 0.5, "mase_k4": 0.7}


def _versus(model: list[float], naive: list[float], seasonal: list[float] | None = None):
    from rnnserve.trainer.forecast.evaluate import versus_naive

    horizons = (1, 4, 16, 64)
    table = {"gru": dict(zip(horizons, model, strict=True)),
             "naive": dict(zip(horizons, naive, strict=True)),
             "drift": dict.fromkeys(horizons, 0.0)}  # fmt: skip
    if seasonal is not None:
        table["seasonal-naive"] = dict(zip(horizons, seasonal, strict=True))
    return versus_naive(table, "gru")


def test_a_model_worse_than_naive_at_every_horizon_gets_a_note() -> None:
    """Only the naive forecasts count (not drift, which beats everything here); a horizon
    with no held-out target (NaN) is not scored, nor written to the manifest."""
    nan = float("nan")
    versus = _versus([2.0, 3.0, 5.0, nan], [1.0, 2.0, 4.0, nan])
    assert versus.worse_than == ["naive"]
    assert versus.to_manifest() == {
        "model": {"mse_k1": 2.0, "mse_k4": 3.0, "mse_k16": 5.0},
        "naive": {"mse_k1": 1.0, "mse_k4": 2.0, "mse_k16": 4.0},
        "worse_than": ["naive"],
    }
    note = versus.note(20, "rnn-trainer backtest --series s.csv --column v")
    assert note == (
        "note: on the validation tail (20 values) the gru forecasts worse than naive (the last "
        "value repeated) at every horizon: MSE k=1: 2 vs naive 1; k=4: 3 vs naive 2; k=16: 5 "
        "vs naive 4; compare it with the baselines out of sample before serving it: "
        "rnn-trainer backtest --series s.csv --column v"
    )


def test_a_model_better_than_naive_at_one_horizon_gets_no_note() -> None:
    versus = _versus([2.0, 3.0, 5.0, 6.0], [1.0, 2.0, 4.0, 6.5])
    assert versus.worse_than == [] and versus.note(20, "x") is None
    assert versus.to_manifest()["worse_than"] == []
    tie = _versus([1.0, 2.0, 4.0, 6.0], [1.0, 2.0, 4.0, 6.0])  # not worse: no note
    assert tie.note(20, "x") is None


def test_with_a_season_the_seasonal_naive_forecast_counts_too() -> None:
    versus = _versus([2.0, 3.0, 5.0, 6.0], [1.0, 4.0, 4.0, 9.0], seasonal=[1.0, 2.0, 3.0, 4.0])
    assert versus.worse_than == ["seasonal-naive"]
    note = versus.note(64, "cmd")
    assert note is not None and "worse than seasonal-naive (the value one season back)" in note
    assert "k=4: 3 vs seasonal-naive 2;" in note and "vs naive" not in note
    both = _versus([2.0, 3.0, 5.0, 6.0], [1.0, 2.0, 4.0, 5.0], seasonal=[1.5, 2.5, 4.5, 5.5])
    assert both.worse_than == ["naive", "seasonal-naive"]
    assert "k=1: 2 vs naive 1, seasonal-naive 1.5;" in str(both.note(64, "cmd"))
    assert set(both.to_manifest()) == {"model", "naive", "seasonal-naive", "worse_than"}


def test_a_model_whose_forecasts_overflow_is_worse_but_its_inf_is_not_written() -> None:
    """inf has no JSON spelling (strict readers refuse the manifest)."""
    inf = float("inf")
    versus = _versus([inf, inf, inf, inf], [1.0, 2.0, 4.0, 5.0])
    assert versus.worse_than == ["naive"] and versus.to_manifest()["model"] == {}
