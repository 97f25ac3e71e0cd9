"""Forecasting models with the export state interface (docs/contracts.md, task `forecast`).

Both read normalised `values` float32 [batch, time, 1] and write `prediction` float32
[batch, time, 1], where prediction[:, t] is x_{t+1} given values up to t and the incoming
state. So the same graph warms up on a history (time = its length) and then steps
(time = 1), feeding each prediction back for k-step forecasts.

- `WindowMLP` (arch mlp): the autoregressive model over a window of tau past values, no
  hidden state. Its state is the window itself, the last tau values (zeros at first).
- `LatentForecaster` (arch rnn / gru / lstm): a latent autoregressive model that keeps a
  summary h_t (and the LSTM's memory cell c_t), [layers, batch, hidden].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rnnserve.artifact.manifest import StateSpec
from rnnserve.trainer.errors import TrainerError

RECURRENT_ARCHS = ("rnn", "gru", "lstm")
FORECAST_ARCHS = ("mlp", *RECURRENT_ARCHS)


class WindowMLP(nn.Module):
    """x̂_{t+1} = MLP(x_{t-tau+1}, ..., x_t): one hidden ReLU layer, as in the textbook."""

    task = "forecast"
    arch = "mlp"
    input_name = "values"
    output_name = "prediction"

    def __init__(self, tau: int = 4, hidden: int = 10) -> None:
        super().__init__()
        if tau < 1 or hidden < 1:
            raise TrainerError(f"mlp needs --tau >= 1 and --hidden >= 1, got {tau} and {hidden}")
        self.tau = tau
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(tau, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def hyperparameters(self) -> dict[str, Any]:
        return {"tau": self.tau, "hidden": self.hidden}

    def state_specs(self) -> list[StateSpec]:
        return [StateSpec("window", "window", "window_out", [-1, self.tau], batch_axis=0, init=0.0)]

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(batch_size, self.tau),)  # [batch, tau]

    def forward(self, values: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # values [batch, time, 1], window [batch, tau]
        seq = torch.cat([window, values[:, :, 0]], dim=1)  # [batch, tau + time]
        # Column j of the features at step t is seq[t + 1 + j]: tau slices whose bounds are
        # constants relative to either end, so `time` stays symbolic in the ONNX graph.
        cols = [seq[:, 1 + j : j + 1 - self.tau or None] for j in range(self.tau)]
        features = torch.stack(cols, dim=2)  # [batch, time, tau]
        prediction = self.net(features)  # [batch, time, 1]
        return prediction, seq[:, -self.tau :]  # next window [batch, tau]


class LatentForecaster(nn.Module):
    """x̂_{t+1} = Linear(h_t) with h_t from a (deep) RNN, GRU or LSTM over x_1..x_t."""

    task = "forecast"
    input_name = "values"
    output_name = "prediction"

    def __init__(self, arch: str = "gru", hidden: int = 32, layers: int = 1) -> None:
        super().__init__()
        if arch not in RECURRENT_ARCHS:
            raise TrainerError(f"--arch must be one of {', '.join(FORECAST_ARCHS)}, got {arch!r}")
        if hidden < 1 or layers < 1:
            raise TrainerError(f"--hidden and --layers must be >= 1, got {hidden} and {layers}")
        self.arch = arch
        self.hidden = hidden
        self.layers = layers
        cell = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[arch]
        self.rnn = cell(1, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def hyperparameters(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "layers": self.layers}

    def state_specs(self) -> list[StateSpec]:
        names = ("h", "c") if self.arch == "lstm" else ("h",)
        shape = [self.layers, -1, self.hidden]
        return [StateSpec(n, n, f"{n}_out", list(shape), batch_axis=1, init=0.0) for n in names]

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        zeros = torch.zeros(self.layers, batch_size, self.hidden)  # [layers, batch, hidden]
        return (zeros, zeros.clone()) if self.arch == "lstm" else (zeros,)

    def forward(self, values: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # values [batch, time, 1]; state: h (and c) [layers, batch, hidden]
        if self.arch == "lstm":
            out, (h, c) = self.rnn(values, (state[0], state[1]))  # out [batch, time, hidden]
            return self.head(out), h, c
        out, h = self.rnn(values, state[0])
        return self.head(out), h  # prediction [batch, time, 1]


def build_model(arch: str, *, tau: int, hidden: int, layers: int) -> nn.Module:
    """The forecasting model for `--arch`; mlp ignores --layers, the recurrent ones --tau."""
    if arch == "mlp":
        return WindowMLP(tau=tau, hidden=hidden)
    if arch in RECURRENT_ARCHS:
        return LatentForecaster(arch=arch, hidden=hidden, layers=layers)
    raise TrainerError(f"--arch must be one of {', '.join(FORECAST_ARCHS)} for --task forecast")


def min_history(model: nn.Module) -> int:
    """manifest.series.tau: the shortest history the model needs (its window, or 1)."""
    return int(getattr(model, "tau", 1)) if getattr(model, "arch", "") == "mlp" else 1
