"""Forecast models: the MLP's window features and state, recurrent state, chunking invariance."""

from __future__ import annotations

import pytest
import torch

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.forecast.models import LatentForecaster, WindowMLP, build_model, min_history


def test_mlp_features_are_the_last_tau_values() -> None:
    torch.manual_seed(0)
    model = WindowMLP(tau=3, hidden=5).eval()
    values = torch.randn(2, 7, 1)  # [batch, time, 1]
    window = torch.randn(2, 3)  # [batch, tau]
    pred, next_window = model(values, window)
    assert pred.shape == (2, 7, 1)
    seq = torch.cat([window, values[:, :, 0]], dim=1)  # [batch, tau + time]
    for t in range(7):  # step t sees x_{t-tau+1}..x_t, i.e. seq[t + 1 : t + 1 + tau]
        expected = model.net(seq[:, t + 1 : t + 4])
        assert torch.allclose(pred[:, t], expected, atol=1e-6)
    assert torch.equal(next_window, seq[:, -3:])


@pytest.mark.parametrize("time", [1, 2, 5])
def test_mlp_window_state_carries_across_calls(time: int) -> None:
    torch.manual_seed(1)
    model = WindowMLP(tau=4).eval()
    values = torch.randn(3, 12, 1)
    whole, whole_window = model(values, *model.initial_state(3))
    state = model.initial_state(3)
    parts = []
    for start in range(0, 12, time):
        out, *state = model(values[:, start : start + time], *state)
        parts.append(out)
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-6)
    assert torch.allclose(state[0], whole_window)


@pytest.mark.parametrize(("arch", "layers"), [("rnn", 1), ("gru", 2), ("lstm", 2)])
def test_recurrent_state_carries_across_calls(arch: str, layers: int) -> None:
    torch.manual_seed(2)
    model = LatentForecaster(arch, hidden=6, layers=layers).eval()
    values = torch.randn(2, 9, 1)
    whole, *whole_state = model(values, *model.initial_state(2))
    state = model.initial_state(2)
    parts = []
    for t in range(9):
        out, *state = model(values[:, t : t + 1], *state)
        parts.append(out)
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-5)
    for got, want in zip(state, whole_state, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_state_specs_match_contract() -> None:
    mlp = WindowMLP(tau=4)
    (window,) = mlp.state_specs()
    assert (window.input, window.output, window.shape, window.batch_axis) == (
        "window",
        "window_out",
        [-1, 4],
        0,
    )
    lstm = LatentForecaster("lstm", hidden=8, layers=2)
    assert [(s.name, s.shape, s.batch_axis) for s in lstm.state_specs()] == [
        ("h", [2, -1, 8], 1),
        ("c", [2, -1, 8], 1),
    ]
    assert [tuple(s.shape) for s in lstm.initial_state(3)] == [(2, 3, 8), (2, 3, 8)]
    assert len(LatentForecaster("gru").state_specs()) == 1
    for model in (mlp, lstm):
        assert (model.task, model.input_name, model.output_name) == (
            "forecast",
            "values",
            "prediction",
        )


def test_build_model_and_min_history() -> None:
    assert min_history(build_model("mlp", tau=6, hidden=3, layers=1)) == 6
    assert min_history(build_model("gru", tau=6, hidden=3, layers=2)) == 1
    assert build_model("lstm", tau=6, hidden=3, layers=2).hyperparameters() == {
        "hidden": 3,
        "layers": 2,
    }
    with pytest.raises(TrainerError, match="--arch must be one of"):
        build_model("ngram", tau=4, hidden=3, layers=1)
    with pytest.raises(TrainerError, match="tau"):
        WindowMLP(tau=0)
