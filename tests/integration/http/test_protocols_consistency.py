"""One request through KServe v2 (gRPC and REST) and the native rnnserve.v1 RPCs: the answer
comes from the version the response names, and a task mismatch tells the KServe inputs the
model does take."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve.kserve import grpc_predict_v2_pb2 as kpb
from rnnserve.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.http.conftest import http_server

ROWS = [[0.0, 0.5, 0.9, 1.0, 0.8, 0.5], [1.0, 0.5, 0.0, -0.5, -0.9, -1.0]]


def _forecast_request() -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="sine-gru")  # no version: the default
    h = request.inputs.add(name="history", datatype="FP64", shape=[2, 6])
    h.contents.fp64_contents.extend(v for row in ROWS for v in row)
    k = request.inputs.add(name="horizon", datatype="INT64", shape=[1])
    k.contents.int64_contents.append(3)
    request.outputs.add(name="forecast")
    return request


def test_a_forecast_batch_runs_on_the_version_it_names(model_repo: Path, tmp_path: Path) -> None:
    """The rows of a [B, T] history looked the model up after an await, so a rescan landing
    then (a new default version) answered them from version 2 while the response said 1.
    Simulated here by publishing version 2 as the first row starts."""
    shutil.copytree(model_repo / "sine-gru" / "1", tmp_path / "sine-gru" / "1")
    srv = http_server(tmp_path)
    try:
        engine = srv.app.engine
        # a different forecaster as version 2, on disk but not yet scanned
        shutil.copytree(model_repo / "sine-mlp" / "1", tmp_path / "sine-gru" / "2")
        forecast = engine.forecast

        async def rescan_lands_first(*args, **kwargs):
            if "2" not in engine.repository.models["sine-gru"]:
                engine.repository.scan()  # what the rescan's install does, on this loop
            return await forecast(*args, **kwargs)

        engine.forecast = rescan_lands_first
        got = kpb_grpc.GRPCInferenceServiceStub(srv.channel).ModelInfer(
            _forecast_request(), timeout=30
        )
        engine.forecast = forecast
        assert engine.repository.default_version("sine-gru").version == "2"  # it did land
        values = np.frombuffer(got.raw_output_contents[0], dtype="<f4").reshape(2, 3)
        for row, out in zip(ROWS, values, strict=True):
            native = srv.stub.Forecast(
                pb.ForecastRequest(
                    model="sine-gru", version=got.model_version, history=row, horizon=3
                ),
                timeout=30,
            )
            assert out.tolist() == pytest.approx(list(native.forecast), rel=1e-5)
    finally:
        srv.stop()


def _text(texts: list[str]) -> dict:
    return {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}


_HISTORY = [
    {"name": "history", "datatype": "FP64", "shape": [6], "data": ROWS[0]},
    {"name": "horizon", "datatype": "INT64", "shape": [1], "data": [2]},
]


@pytest.mark.parametrize(
    ("model", "inputs", "takes"),
    [
        ("sine-gru", [_text(["a b"])], "(KServe inputs: history, horizon)"),
        ("bilstm", [_text(["a b"])], "(KServe inputs: left, right, optional top_k)"),
        ("lstm", _HISTORY, "(KServe inputs: text; or left, right, optional top_k)"),
    ],
)
def test_a_task_mismatch_names_the_inputs_the_model_takes(
    server, base_url: str, model: str, inputs: list[dict], takes: str
) -> None:
    """The Engine's reason ended "use Forecast" / "use Infill", RPCs a KServe client does not
    call: it sends tensors. Same code as the native call (FAILED_PRECONDITION, REST 400)."""
    request = urllib.request.Request(
        f"{base_url}/v2/models/{model}/infer", json.dumps({"inputs": inputs}).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as rest:
        urllib.request.urlopen(request, timeout=30)
    assert rest.value.code == 400
    message = json.loads(rest.value.read())["error"]
    assert message.startswith(f"model {model}/1 cannot serve ") and message.endswith(takes)

    grpc_request = kpb.ModelInferRequest(model_name=model)
    for t in inputs:
        added = grpc_request.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        if t["datatype"] == "BYTES":
            added.contents.bytes_contents.extend(v.encode() for v in t["data"])
        elif t["datatype"] == "FP64":
            added.contents.fp64_contents.extend(t["data"])
        else:
            added.contents.int64_contents.extend(t["data"])
    with pytest.raises(grpc.RpcError) as err:
        kpb_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(grpc_request, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == message
