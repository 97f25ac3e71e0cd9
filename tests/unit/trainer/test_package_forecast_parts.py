"""The parts of `rnn-trainer package --task forecast` on their own: reading a forecaster's
interface (window state or recurrent), the stateless window model wrapped to carry its
window exactly as the trainer's WindowMLP does, and the flags' refusals and intervals."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.forecast.models import WindowMLP
from rnnserve.trainer.package_forecast import (
    ForecastPackageRequest,
    architecture_of,
    check_request,
    given_intervals,
    representation_of,
)
from rnnserve.trainer.package_forecast_graph import (
    adapt_forecast,
    carried_window,
    check_forecast_graph,
    check_forecast_interface,
    resolve_forecast,
)


def _exported(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str],
              axes: dict, path: Path) -> onnx.ModelProto:  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes)  # fmt: skip
    return onnx.load(str(path))


def _window_mlp() -> WindowMLP:
    torch.manual_seed(0)
    return WindowMLP(tau=3, hidden=5).eval()


def test_a_stateless_window_model_is_wrapped_to_compute_what_window_mlp_computes(
    tmp_path: Path,
) -> None:
    """Its net alone, [n, 3] -> [n, 1], wrapped: the same predictions and next window as the
    trainer's WindowMLP (the window carried as state) on any time length and batch."""
    mlp = _window_mlp()
    model = _exported(mlp.net, (torch.zeros(2, 3),), ["features"], ["next"],
                      {"features": {0: "n"}, "next": {0: "n"}}, tmp_path / "net.onnx")  # fmt: skip
    found = resolve_forecast(model)
    assert found.window is not None and found.window.tau == 3 and found.layout == "window"
    wrapped = adapt_forecast(model, found).SerializeToString()
    check_forecast_interface(model.graph, wrapped, found)
    assert carried_window(wrapped, found) == 3
    session = ort.InferenceSession(wrapped, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, time in ((1, 1), (2, 7), (3, 2)):
        x = rng.standard_normal((batch, time, 1)).astype(np.float32)
        window = rng.standard_normal((batch, 3)).astype(np.float32)
        got, got_window = session.run(["prediction", "window_out"],
                                      {"values": x, "window": window})  # fmt: skip
        with torch.no_grad():
            want, want_window = mlp(torch.from_numpy(x), torch.from_numpy(window))
        np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
        np.testing.assert_allclose(got_window, want_window.numpy(), atol=0)
    record = check_forecast_graph(wrapped, found.iface, None, "")
    assert record["ok"] and record["compared"] == "predictions"


def test_a_window_carried_as_state_is_read_as_the_window(tmp_path: Path) -> None:
    """The trainer's own WindowMLP exported by plain torch: arch mlp, tau from its state."""
    mlp = _window_mlp()
    axes = {"values": {0: "b", 1: "t"}, "prediction": {0: "b", 1: "t"}, "window": {0: "b"},
            "window_out": {0: "b"}}  # fmt: skip
    model = _exported(mlp, (torch.zeros(2, 4, 1), torch.zeros(2, 3)), ["values", "window"],
                      ["prediction", "window_out"], axes, tmp_path / "w.onnx")  # fmt: skip
    found = resolve_forecast(model)
    assert found.window is None and [s.input for s in found.iface.states] == ["window"]
    carried = carried_window(adapt_forecast(model, found).SerializeToString(), found)
    assert carried == 3 and architecture_of(model.graph, None, carried) == "mlp"


def _other_ops_graph() -> onnx.ModelProto:
    """A recurrence of plain ops (no LSTM/GRU/RNN op) whose state [batch, 3] is no window."""
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Identity", ["values"], ["prediction"]),
         helper.make_node("Neg", ["h"], ["h_out"])],
        "cell",
        [helper.make_tensor_value_info("values", f, ["b", "t", 1]),
         helper.make_tensor_value_info("h", f, ["b", 3])],
        [helper.make_tensor_value_info("prediction", f, ["b", "t", 1]),
         helper.make_tensor_value_info("h_out", f, ["b", 3])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_state_that_is_no_window_leaves_the_architecture_to_name() -> None:
    model = _other_ops_graph()
    found = resolve_forecast(model)
    assert carried_window(model.SerializeToString(), found) is None
    with pytest.raises(TrainerError, match=r"no window state in the graph.*--arch"):
        architecture_of(model.graph, None, None)
    assert architecture_of(model.graph, "gru", None) == "gru"


def test_given_residual_stds_make_normal_intervals_that_never_narrow() -> None:
    entry = given_intervals([0.5, 0.3, 1.0])
    z = 1.6448536269514722
    np.testing.assert_allclose(entry["upper"], [z * 0.5, z * 0.5, z * 1.0], rtol=1e-5)
    np.testing.assert_allclose(entry["lower"], [-z * 0.5, -z * 0.5, -z * 1.0], rtol=1e-5)
    assert entry["levels"] == [0.05, 0.95]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({}, "needs the normalisation its model was trained with"),
     ({"std": 2.0}, "--std needs --mean too"),
     ({"mean": 0.0, "std": 0.0}, "--std must be a positive finite number"),
     ({"mean": float("nan"), "std": 1.0}, "--mean must be a finite number"),
     ({"series": Path("s.csv")}, "--series FILE.csv and --column NAME go together"),
     ({"mean": 0.0, "std": 1.0, "residual_std": [0.1, -1.0]}, "--residual-std must be a"
                                                               " positive"),
     ({"mean": 0.0, "std": 1.0, "tau": 0}, "--tau must be at least 1")],
)  # fmt: skip
def test_missing_or_malformed_flags_are_refused(fields: dict, expected: str) -> None:
    request = ForecastPackageRequest(Path("g.onnx"), Path("out"), "f", **fields)
    with pytest.raises(TrainerError, match=expected):
        check_request(request)


def test_the_representation_is_one_the_model_was_trained_on() -> None:
    assert representation_of("diff", 12).name == "seasonal-diff(12)+diff"
    with pytest.raises(TrainerError, match="--transform must be one of level, diff"):
        representation_of("auto", 0)
    with pytest.raises(TrainerError, match="--season must be 0 \\(none\\) or a period >= 2"):
        representation_of("level", 1)
