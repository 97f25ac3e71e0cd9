"""Forecasters through trainer.export.export_model, then run in ONNX Runtime like the server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rnnserve.artifact.manifest import Manifest
from rnnserve.trainer.export import export_model
from rnnserve.trainer.exportable import state_from_spec
from rnnserve.trainer.forecast.evaluate import TorchForecaster
from rnnserve.trainer.forecast.models import build_model, min_history
from rnnserve.trainer.forecast.series import load_series


def ort_k_step(package: Path, history: np.ndarray, horizon: int) -> np.ndarray:
    """What the Forecast RPC does: normalise, warm up in one call, feed predictions back."""
    manifest = Manifest.load(package)
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    mean, std = manifest.series["mean"], manifest.series["std"]
    state = {s.input: state_from_spec(s, 1) for s in manifest.state}
    x = ((history - mean) / std).astype(np.float32).reshape(1, -1, 1)  # [1, time, 1]
    outputs = [manifest.output_name, *(s.output for s in manifest.state)]
    preds = []
    for _ in range(horizon):
        pred, *next_state = session.run(outputs, {manifest.input_name: x, **state})
        state = {s.input: v for s, v in zip(manifest.state, next_state, strict=True)}
        x = pred[:, -1:]  # [1, 1, 1]
        preds.append(float(pred[0, -1, 0]) * std + mean)
    return np.array(preds)


@pytest.mark.parametrize(
    ("arch", "layers"),
    [
        ("mlp", 1),
        ("rnn", 1),
        pytest.param("gru", 2, marks=pytest.mark.slow),
        pytest.param("lstm", 2, marks=pytest.mark.slow),
    ],
)
def test_export_and_onnx_forecast_match_torch(tmp_path: Path, arch: str, layers: int) -> None:
    torch.manual_seed(0)
    series = load_series(None, None, tau=4)
    model = build_model(arch, tau=4, hidden=6, layers=layers).eval()
    path = export_model(
        model,
        tmp_path,
        name=f"sine-{arch}",
        vocab=None,
        tokenizer=None,
        series=series.normaliser.manifest_series(min_history(model)),
        metrics={"mse_k1": 0.5},
    )
    manifest = Manifest.load(path)
    assert manifest.task == "forecast" and manifest.architecture == arch
    assert (manifest.input_name, manifest.output_name) == ("values", "prediction")
    assert manifest.series["tau"] == (4 if arch == "mlp" else 1)
    assert manifest.parity["ok"] is True and manifest.parity["symbolic_axes"] is True
    expected_state = ["window"] if arch == "mlp" else (["h", "c"] if arch == "lstm" else ["h"])
    assert [s.name for s in manifest.state] == expected_state

    origin = 650
    torch_preds = TorchForecaster(model).k_step(series.normalised, np.array([origin]), 8)
    want = series.normaliser.undo(torch_preds[0])
    got = ort_k_step(path, series.values[: origin + 1], 8)
    assert np.allclose(got, want, atol=1e-4)
