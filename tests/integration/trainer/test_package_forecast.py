"""Bring your own forecaster: tiny forecasters trained by plain torch code of the user's own (a
time-major GRU on first differences, a batch-first LSTM on seasonal differences, the
textbook's window MLP on levels), exported by plain `torch.onnx.export`, packaged by
`rnn-trainer package --task forecast`, then served by a real in-process server: Forecast
answers in the series' units, with intervals, what the user's torch model computes."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from rnnserve.artifact.manifest import Manifest
from rnnserve.trainer import cli
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings

LENGTH, SEASON, WINDOW, HORIZON = 240, 12, 4, 12
Z90 = 1.6448536269514722  # the 95 % quantile of the standard normal


def _series() -> np.ndarray:
    """A trending, seasonal monthly series (series units around 50-60)."""
    t = np.arange(LENGTH)
    noise = np.random.default_rng(0).normal(0.0, 0.5, LENGTH)
    return 50 + 0.05 * t + 4 * np.sin(2 * np.pi * t / SEASON) + noise


class TimeMajorGRU(nn.Module):
    """nn.GRU's default layout: x [time, batch, 1], h [1, batch, hidden]."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(1, 8), nn.Linear(8, 1)

    def forward(self, x, h):
        out, h = self.rnn(x, h)
        return self.head(out), h


class BatchFirstLSTM(nn.Module):
    """x [batch, time, 1], (h, c) [1, batch, hidden]."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(1, 8, batch_first=True), nn.Linear(8, 1)

    def forward(self, x, h, c):
        out, (h, c) = self.rnn(x, (h, c))
        return self.head(out), h, c


def _window_mlp() -> nn.Module:
    """The textbook's autoregressive MLP: the last WINDOW values -> the next."""
    return nn.Sequential(nn.Linear(WINDOW, 10), nn.ReLU(), nn.Linear(10, 1))


def _fit(model: nn.Module, loss_of, steps: int = 60) -> nn.Module:
    """The user's own loop: a few full-batch Adam steps (what is checked does not depend on
    how well it is trained: the served numbers must equal this torch model's)."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        loss = loss_of(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _padded(r: np.ndarray, lost: int, mean: float, std: float) -> np.ndarray:
    """The normalised representation as Forecast feeds it: 0 for the first `lost` values."""
    return np.concatenate([np.zeros(lost), (r - mean) / std]).astype(np.float32)


def _export(
    model: nn.Module, args: tuple, path: Path, names: tuple[list, list], axes: dict
) -> Path:
    """Plain torch.onnx.export, as the user's own code calls it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17,
                          input_names=names[0], output_names=names[1],
                          dynamic_axes=axes)  # fmt: skip
    return path


GRU_AXES = {"x": {0: "time", 1: "batch"}, "y": {0: "time", 1: "batch"}, "h0": {1: "batch"},
            "hn": {1: "batch"}}  # fmt: skip
LSTM_AXES = {"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}, "h0": {1: "batch"},
             "c0": {1: "batch"}, "hn": {1: "batch"}, "cn": {1: "batch"}}  # fmt: skip


def _package(tmp: Path, onnx_path: Path, name: str, *flags: str) -> int:
    return cli.main(["package", "--task", "forecast", "--onnx", str(onnx_path), "--out",
                     str(tmp / "models"), "--name", name, *flags])  # fmt: skip


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three users' models, trained and exported, and the series CSV (t, load)."""
    tmp = tmp_path_factory.mktemp("byo-forecast")
    x = _series()
    csv = tmp / "load.csv"
    csv.write_text("t,load\n" + "".join(f"{i},{float(v)!r}\n" for i, v in enumerate(x)))
    # GRU on first differences, normalised with their statistics over the whole column
    d = np.diff(x)
    gru_norm = (float(d.mean()), float(d.std()))
    zg = torch.from_numpy(_padded(d, 1, *gru_norm)).view(-1, 1, 1)  # [time, batch 1, 1]
    gru = _fit(TimeMajorGRU(), lambda m: nn.functional.mse_loss(
        m(zg[:-1], torch.zeros(1, 1, 8))[0][1:], zg[2:]))  # fmt: skip
    # LSTM on seasonal differences (period 12)
    s = x[SEASON:] - x[:-SEASON]
    lstm_norm = (float(s.mean()), float(s.std()))
    zl = torch.from_numpy(_padded(s, SEASON, *lstm_norm)).view(1, -1, 1)  # [batch 1, time, 1]
    zeros = torch.zeros(1, 1, 8)
    lstm = _fit(BatchFirstLSTM(), lambda m: nn.functional.mse_loss(
        m(zl[:, :-1], zeros, zeros)[0][:, SEASON:], zl[:, SEASON + 1 :]))  # fmt: skip
    # window MLP on levels, normalised with the first 200 values' statistics (given as flags)
    mlp_norm = (float(x[:200].mean()), float(x[:200].std()))
    zm = torch.from_numpy(((x - mlp_norm[0]) / mlp_norm[1]).astype(np.float32))
    windows = zm.unfold(0, WINDOW, 1)[:-1]  # [n, WINDOW] -> the value after each
    mlp = _fit(_window_mlp(), lambda m: nn.functional.mse_loss(m(windows)[:, 0], zm[WINDOW:]))
    graphs = {
        "gru": _export(gru, (torch.zeros(5, 2, 1), torch.zeros(1, 2, 8)), tmp / "gru.onnx",
                       (["x", "h0"], ["y", "hn"]), GRU_AXES),
        "lstm": _export(lstm, (torch.zeros(2, 5, 1), zeros.repeat(1, 2, 1), zeros.repeat(1, 2, 1)),
                        tmp / "lstm.onnx", (["x", "h0", "c0"], ["y", "hn", "cn"]), LSTM_AXES),
        "mlp": _export(mlp, (torch.zeros(2, WINDOW),), tmp / "mlp.onnx",
                       (["features"], ["next"]), {"features": {0: "n"}, "next": {0: "n"}}),
    }  # fmt: skip
    models = {"gru": gru, "lstm": lstm, "mlp": mlp}
    norms = {"gru": gru_norm, "lstm": lstm_norm, "mlp": mlp_norm}
    return {"tmp": tmp, "x": x, "csv": csv, "graphs": graphs, "models": models, "norms": norms}


@pytest.fixture(scope="module")
def served(users: dict) -> Iterator[ServerThread]:
    tmp, csv, graphs = users["tmp"], str(users["csv"]), users["graphs"]
    series = ["--series", csv, "--column", "load"]
    mean, std = users["norms"]["mlp"]
    assert _package(tmp, graphs["gru"], "load-gru", *series, "--transform", "diff") == 0
    assert _package(tmp, graphs["lstm"], "load-lstm", *series, "--season", str(SEASON)) == 0
    assert _package(tmp, graphs["mlp"], "load-mlp", "--mean", str(mean), "--std", str(std),
                    "--residual-std", "0.6,0.9") == 0  # fmt: skip
    srv = ServerThread(make_settings(tmp / "models")).start()
    yield srv
    srv.stop()


def _forecast(srv: ServerThread, name: str, history: np.ndarray) -> pb.ForecastResponse:
    request = pb.ForecastRequest(model=name, history=history.tolist(), horizon=HORIZON,
                                 return_fitted=True)  # fmt: skip
    return srv.stub.Forecast(request, timeout=60)


@torch.no_grad()
def _gru_reference(model: nn.Module, x: np.ndarray, norm: tuple[float, float]):
    """The user's own forecast: differences in, fed back, cumulated onto the last value.
    Returns (forecast [HORIZON], fitted levels of x[2:])."""
    mean, std = norm
    z = torch.from_numpy(_padded(np.diff(x), 1, mean, std)).view(-1, 1, 1)
    out, h = model(z, torch.zeros(1, 1, 8))
    steps, step = [out[-1]], out[-1:]
    for _ in range(HORIZON - 1):
        step, h = model(step, h)
        steps.append(step[0])
    r = torch.cat(steps).view(-1).double().numpy() * std + mean
    fitted = x[1:-1] + out[1:-1].view(-1).double().numpy() * std + mean
    return x[-1] + np.cumsum(r), fitted


@torch.no_grad()
def _lstm_reference(model: nn.Module, x: np.ndarray, norm: tuple[float, float]):
    """Seasonal differences in; x̂_{T+j} = x_{T+j-12} + ŷ_{T+j} (HORIZON <= SEASON)."""
    mean, std = norm
    z = torch.from_numpy(_padded(x[SEASON:] - x[:-SEASON], SEASON, mean, std)).view(1, -1, 1)
    h = c = torch.zeros(1, 1, 8)
    out, h, c = model(z, h, c)
    steps, step = [out[0, -1, 0]], out[:, -1:]
    for _ in range(HORIZON - 1):
        step, h, c = model(step, h, c)
        steps.append(step[0, 0, 0])
    y = torch.stack(steps).double().numpy() * std + mean
    fitted = x[1 : len(x) - SEASON] + out[0, SEASON:-1, 0].double().numpy() * std + mean
    return x[len(x) - SEASON : len(x) - SEASON + HORIZON] + y, fitted


@torch.no_grad()
def _mlp_reference(model: nn.Module, x: np.ndarray, norm: tuple[float, float]):
    """The textbook's k-step forecast: each prediction joins the window for the next."""
    mean, std = norm
    z = torch.from_numpy(((x - mean) / std).astype(np.float32))
    window, out = z[-WINDOW:], []
    for _ in range(HORIZON):
        nxt = model(window.view(1, -1))[0, 0]
        out.append(float(nxt))
        window = torch.cat([window[1:], nxt.view(1)])
    fitted = model(z.unfold(0, WINDOW, 1)[:-1])[:, 0].double().numpy() * std + mean
    return np.asarray(out) * std + mean, fitted


REFERENCES = {"gru": _gru_reference, "lstm": _lstm_reference, "mlp": _mlp_reference}
FITTED_OFFSET = {"gru": 2, "lstm": SEASON + 1, "mlp": WINDOW}  # window + differencing


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_served_forecast_equals_the_users_torch_model_in_series_units(
    served: ServerThread, users: dict, kind: str
) -> None:
    history = users["x"][:200]
    res = _forecast(served, f"load-{kind}", history)
    forecast, fitted = REFERENCES[kind](users["models"][kind], history, users["norms"][kind])
    np.testing.assert_allclose(res.forecast, forecast, rtol=1e-5, atol=1e-3)
    assert 50 < res.forecast[0] < 70  # load units, not a normalised difference
    assert res.fitted_offset == FITTED_OFFSET[kind]
    np.testing.assert_allclose(res.fitted, fitted, rtol=1e-5, atol=1e-3)
    lower, upper = np.asarray(res.lower), np.asarray(res.upper)
    assert len(lower) == len(upper) == HORIZON
    assert np.all(lower <= res.forecast) and np.all(res.forecast <= upper)
    assert np.all(np.diff(upper - lower) >= -1e-9)  # widths never shrink with the horizon


def test_the_manifest_is_a_forecast_manifest_of_the_trainers_shape(served, users) -> None:
    models = users["tmp"] / "models"
    gru, lstm, mlp = (Manifest.load(models / f"load-{k}" / "1") for k in ("gru", "lstm", "mlp"))
    assert (gru.task, gru.architecture, gru.input_name, gru.output_name) == (
        "forecast", "gru", "x", "y")  # fmt: skip
    assert [(s.input, s.output, s.batch_axis) for s in gru.state] == [("h0", "hn", 1)]
    assert gru.training["layout"] == "time-major" and lstm.training["layout"] == "batch-major"
    assert [s.input for s in lstm.state] == ["h0", "c0"]
    for m in (gru, lstm, mlp):  # the keys `train --task forecast` writes
        assert set(m.series) == {"mean", "std", "tau", "features", "representation", "intervals"}
        assert len(m.series["intervals"]["lower"]) == len(m.series["intervals"]["upper"])
        assert m.parity["ok"] is True and m.parity["compared"] == "predictions"
    d = np.diff(users["x"])
    assert gru.series["mean"] == pytest.approx(d.mean()) and gru.series["std"] == pytest.approx(
        d.std())  # fmt: skip
    assert gru.series["representation"] == {"name": "diff", "difference": 1, "season": 0}
    assert lstm.series["representation"]["season"] == SEASON and lstm.series["tau"] == SEASON + 1
    assert (mlp.architecture, mlp.series["tau"], mlp.hyperparameters["tau"]) == ("mlp", 4, 4)
    assert (mlp.series["mean"], mlp.series["std"]) == pytest.approx(users["norms"]["mlp"])
    assert mlp.training["layout"] == "window"
    assert len(gru.series["intervals"]["lower"]) == 64  # k = 1..64, as train computes them


def test_intervals_are_the_series_residual_quantiles_or_the_given_scale(served, users) -> None:
    """--series: the 5 % / 95 % quantiles of the one-step residuals over the series (after the
    recurrent warm-up of 16 steps) are the first step's interval; --residual-std S1,S2: a
    normal 90 % interval of S1, then S2 for every later step."""
    x = users["x"]
    _forecast_levels, fitted = _gru_reference(users["models"]["gru"], x, users["norms"]["gru"])
    residuals = x[2:] - fitted  # fitted[i] predicts x[i + 2]
    low, high = np.quantile(residuals[16:], (0.05, 0.95))  # origins from 16 + 1 (difference)
    gru = Manifest.load(users["tmp"] / "models" / "load-gru" / "1").series["intervals"]
    assert gru["lower"][0] == pytest.approx(min(low, 0.0), abs=1e-4)
    assert gru["upper"][0] == pytest.approx(max(high, 0.0), abs=1e-4)
    res = _forecast(served, "load-mlp", x[:200])
    offsets = Z90 * np.array([0.6] + [0.9] * (HORIZON - 1))
    np.testing.assert_allclose(np.asarray(res.upper) - res.forecast, offsets, atol=1e-4)
    np.testing.assert_allclose(np.asarray(res.forecast) - res.lower, offsets, atol=1e-4)


def test_a_history_shorter_than_the_window_is_a_client_error(served: ServerThread) -> None:
    request = pb.ForecastRequest(model="load-mlp", history=[50.0, 51.0, 52.0], horizon=2)
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Forecast(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least 4" in err.value.details()


class _Features(nn.Module):
    """Three values a step: not the one series Forecast feeds."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 1)

    def forward(self, x, h):
        out, h = self.rnn(x, h)
        return self.head(out), h


class _LastStep(BatchFirstLSTM):
    """Predicts only after the last step: nothing to feed back per step, no fitted values."""

    def forward(self, x, h, c):
        out, (h, c) = self.rnn(x, (h, c))
        return self.head(out[:, -1]), h, c


class _NoState(nn.Module):
    """Starts from zeros inside: Forecast could not carry the state from call to call."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(1, 4, batch_first=True), nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class _DropsState(_NoState):
    def forward(self, x, h):
        return self.head(self.rnn(x, h)[0])


class _Tokens(nn.Module):
    """A language model: token ids in."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.rnn = nn.Embedding(5, 4), nn.GRU(4, 4, batch_first=True)

    def forward(self, tokens, h):
        out, h = self.rnn(self.embed(tokens), h)
        return out, h


def _misfit_graph(case: str, tmp: Path, users: dict) -> Path:
    h = torch.zeros(1, 2, 4)
    bt = {"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}, "h0": {1: "b"}, "hn": {1: "b"}}
    if case == "features per step":
        return _export(_Features(), (torch.zeros(2, 5, 3), h), tmp / "g.onnx",
                       (["x", "h0"], ["y", "hn"]), bt)  # fmt: skip
    if case == "last step only":
        z = torch.zeros(1, 2, 8)
        return _export(_LastStep(), (torch.zeros(2, 5, 1), z, z), tmp / "g.onnx",
                       (["x", "h0", "c0"], ["y", "hn", "cn"]),
                       {**LSTM_AXES, "y": {0: "batch"}})  # fmt: skip
    if case == "no state":
        return _export(_NoState(), (torch.zeros(2, 5, 1),), tmp / "g.onnx", (["x"], ["y"]),
                       {"x": bt["x"], "y": bt["y"]})  # fmt: skip
    if case == "state not returned":
        return _export(_DropsState(), (torch.zeros(2, 5, 1), h), tmp / "g.onnx",
                       (["x", "h0"], ["y"]), {k: bt[k] for k in ("x", "y", "h0")})  # fmt: skip
    if case == "fixed time axis":  # time-major, dynamic_axes naming the batch alone
        return _export(TimeMajorGRU(), (torch.zeros(5, 2, 1), torch.zeros(1, 2, 8)),
                       tmp / "g.onnx", (["x", "h0"], ["y", "hn"]),
                       {name: {1: "b"} for name in ("x", "y", "h0", "hn")})  # fmt: skip
    if case == "token ids":
        return _export(_Tokens(), (torch.zeros(2, 5, dtype=torch.long), h), tmp / "g.onnx",
                       (["tokens", "h0"], ["y", "hn"]),
                       {"tokens": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}, "h0": {1: "b"},
                        "hn": {1: "b"}})  # fmt: skip
    if case == "window of fixed batch":
        return _export(_window_mlp(), (torch.zeros(2, WINDOW),), tmp / "g.onnx",
                       (["features"], ["next"]), {})  # fmt: skip
    return users["graphs"]["gru"]


NORMALISED = ["--mean", "0", "--std", "1"]
MISFITS = {
    "features per step": (NORMALISED, "values input x (float32 [b, t, 3]) reads 3 values per"
                                      " step; the server forecasts one series"),
    "last step only": (NORMALISED, "no output is a prediction [batch, time, 1]"),
    "no state": (NORMALISED, "the graph has no state inputs"),
    "state not returned": (NORMALISED, "state input h0 (float32 [1, b, 4]) has no output of"
                                       " the same dtype and shape"),
    "fixed time axis": (NORMALISED, "axis 0 (time) of 'x' is fixed to 5; it must be symbolic"),
    "token ids": (NORMALISED, "token ids in make a language model: leave out --task forecast"),
    "window of fixed batch": (NORMALISED, "window input features (float32 [2, 4]): axis 0"
                                          " (batch) is fixed to 2"),
    "no normalisation": ([], "a forecaster needs the normalisation its model was trained with:"
                             " give --mean and --std"),
    "mean without std": (["--mean", "3"], "--mean needs --std too"),
    "a language model's flag": ([*NORMALISED, "--vocab", "v.txt"], "--vocab applies to"
                                " language models (--task lm), not to --task forecast"),
    "int8": ([*NORMALISED, "--precision", "int8"], "--precision int8 applies to rnn/gru/lstm"
                                                    " text models, not to this gru (forecast)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_a_forecaster_that_does_not_fit_is_refused_with_the_reason(
    users: dict, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    flags, expected = MISFITS[case]
    graph = _misfit_graph(case, tmp_path, users)
    assert _package(tmp_path, graph, "f", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "models" / "f").exists()


def test_forecast_flags_without_the_task_are_refused(users, tmp_path, capsys) -> None:
    """Without --task a graph is packaged as a language model: --mean there was ignored."""
    argv = ["package", "--onnx", str(users["graphs"]["gru"]), "--out", str(tmp_path), "--name",
            "f", "--mean", "0", "--std", "1"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--mean, --std apply to forecasters (--task forecast), not to a language model;" \
        " add --task forecast" in err, err  # fmt: skip
    assert cli.main(argv[:-4]) == 2
    assert "needs --vocab and --tokenizer (a forecaster: add --task forecast)" in (
        capsys.readouterr().err)  # fmt: skip
