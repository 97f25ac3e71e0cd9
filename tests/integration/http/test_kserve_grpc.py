"""KServe v2 over gRPC with the generated stubs: typed contents (tritonclient covers raw),
status codes, metadata, and reflection listing the service."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rnnserve.kserve import grpc_predict_v2_pb2 as kpb
from rnnserve.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc
from rnnserve.v1 import rnnserve_pb2 as pb


@pytest.fixture(scope="module")
def kserve(server) -> kpb_grpc.GRPCInferenceServiceStub:
    return kpb_grpc.GRPCInferenceServiceStub(server.channel)


def _score_request(texts: list[bytes], model: str = "lstm") -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, id="q7")
    t = request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    t.contents.bytes_contents.extend(texts)
    return request


def test_typed_contents_score_matches_native(server, kserve) -> None:
    got = kserve.ModelInfer(_score_request([b"the time traveller"]), timeout=30)
    assert got.id == "q7" and got.model_version == "1"
    ppl = np.frombuffer(got.raw_output_contents[0], dtype="<f8")
    native = server.stub.Score(pb.ScoreRequest(model="lstm", texts=["the time traveller"]))
    assert ppl.tolist() == pytest.approx([native.results[0].perplexity])
    assert list(got.outputs[2].shape) == [1] and got.outputs[2].datatype == "INT64"


def test_forecast_batch_of_series(server, kserve) -> None:
    request = kpb.ModelInferRequest(model_name="sine-gru")
    rows = [[0.0, 0.5, 0.9, 1.0], [1.0, 0.5, 0.0, -0.5]]
    h = request.inputs.add(name="history", datatype="FP32", shape=[2, 4])
    h.contents.fp32_contents.extend(v for row in rows for v in row)
    k = request.inputs.add(name="horizon", datatype="INT64", shape=[1])
    k.contents.int64_contents.append(3)
    request.outputs.add(name="forecast")
    got = kserve.ModelInfer(request, timeout=30)
    assert list(got.outputs[0].shape) == [2, 3]
    values = np.frombuffer(got.raw_output_contents[0], dtype="<f4").reshape(2, 3)
    for row, out in zip(rows, values, strict=True):
        native = server.stub.Forecast(pb.ForecastRequest(model="sine-gru", history=row, horizon=3))
        assert out.tolist() == pytest.approx(list(native.forecast), rel=1e-5)


def test_forecast_returns_the_native_interval_bounds(server, kserve) -> None:
    """lower / upper are the native Forecast's lower[] / upper[] (FP32, like forecast)."""
    request = kpb.ModelInferRequest(model_name="sine-gru")
    row = [0.0, 0.5, 0.9, 1.0, 0.8]
    h = request.inputs.add(name="history", datatype="FP64", shape=[5])
    h.contents.fp64_contents.extend(row)
    k = request.inputs.add(name="horizon", datatype="INT64", shape=[1])
    k.contents.int64_contents.append(4)
    got = kserve.ModelInfer(request, timeout=30)
    assert [(o.name, o.datatype, list(o.shape)) for o in got.outputs] == [
        (name, "FP32", [4]) for name in ("forecast", "lower", "upper")
    ]
    out = {
        o.name: np.frombuffer(raw, dtype="<f4").tolist()
        for o, raw in zip(got.outputs, got.raw_output_contents, strict=True)
    }
    native = server.stub.Forecast(pb.ForecastRequest(model="sine-gru", history=row, horizon=4))
    assert native.lower and native.upper
    assert out["lower"] == pytest.approx(list(native.lower), rel=1e-5)
    assert out["upper"] == pytest.approx(list(native.upper), rel=1e-5)
    lo, f, hi = (np.array(out[n]) for n in ("lower", "forecast", "upper"))
    assert np.all(lo <= f) and np.all(f <= hi)
    m = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="sine-gru"), timeout=10)
    assert [o.name for o in m.outputs] == ["forecast", "lower", "upper"]


def _forecast_request(horizon_type: str, horizon: int) -> kpb.ModelInferRequest:
    """A typed-contents forecast whose horizon is an INT8 / UINT8 (int_contents is 32-bit)."""
    request = kpb.ModelInferRequest(model_name="sine-gru")
    h = request.inputs.add(name="history", datatype="FP32", shape=[3])
    h.contents.fp32_contents.extend([0.0, 0.5, 1.0])
    k = request.inputs.add(name="horizon", datatype=horizon_type, shape=[1])
    field = "uint_contents" if horizon_type.startswith("U") else "int_contents"
    getattr(k.contents, field).append(horizon)
    return request


def _unknown_datatype(model: str, version: str = "") -> kpb.ModelInferRequest:
    request = _score_request([b"x y"], model=model)
    request.model_version = version
    request.inputs[0].datatype = "TEXT"
    return request


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (_score_request([b"x y"], model="missing"), grpc.StatusCode.NOT_FOUND),
        # the model is judged before the body, as REST's 404 and native calls do
        (_unknown_datatype("missing"), grpc.StatusCode.NOT_FOUND),
        (_unknown_datatype("lstm", "9"), grpc.StatusCode.NOT_FOUND),
        (_score_request([b"x y"], model="sine-gru"), grpc.StatusCode.FAILED_PRECONDITION),
        (_score_request([b"x"]), grpc.StatusCode.INVALID_ARGUMENT),  # one token: nothing to score
        (kpb.ModelInferRequest(model_name="lstm"), grpc.StatusCode.INVALID_ARGUMENT),
        (kpb.ModelInferRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (_forecast_request("INT8", 1000), grpc.StatusCode.INVALID_ARGUMENT),  # was INTERNAL
        (_forecast_request("UINT8", 300), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_errors_have_the_native_codes(kserve, request_, code) -> None:
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(request_, timeout=30)
    assert err.value.code() == code and err.value.details()


def test_a_shape_whose_element_count_wraps_int64_is_refused(kserve) -> None:
    request = _score_request([b"a b"])
    request.inputs[0].shape[:] = [7, 7905747460161236407]  # 7 x that = 1 modulo 2^64
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "elements" in err.value.details()


def test_raw_count_must_match_inputs(kserve) -> None:
    request = _score_request([b"ab"])
    request.raw_input_contents.extend([b"", b""])
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(request, timeout=30)
    assert "raw_input_contents" in err.value.details()


def test_health_and_metadata(kserve) -> None:
    assert kserve.ServerLive(kpb.ServerLiveRequest(), timeout=10).live
    assert kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
    assert kserve.ModelReady(kpb.ModelReadyRequest(name="bilstm"), timeout=10).ready
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelReady(kpb.ModelReadyRequest(name="missing"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    meta = kserve.ServerMetadata(kpb.ServerMetadataRequest(), timeout=10)
    assert meta.name == "rnnserve" and meta.version
    m = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="bilstm"), timeout=10)
    assert [i.name for i in m.inputs] == ["left", "right", "top_k"]
    assert [o.datatype for o in m.outputs] == ["BYTES", "INT64", "FP32"]


@pytest.mark.parametrize("method", ["ServerLive", "ServerReady", "ModelReady", "ModelInfer"])
def test_bytes_that_are_no_message_are_invalid_argument(server, method: str) -> None:
    """The probes parsed their request outside the interceptor's guard: UNKNOWN, and a
    DecodeError traceback logged per call."""
    call = server.channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
    with pytest.raises(grpc.RpcError) as err:
        call(b"\x1a\x05hello\x22\x80\x80", timeout=30)  # a varint cut short
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in err.value.details()


def test_grpc_health_knows_the_service(server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ask = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
    reply = health_pb2_grpc.HealthStub(server.channel).Check(ask, timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(stub.ServerReflectionInfo(iter([ask]), timeout=10)))
    names = {s.name for s in reply.list_services_response.service}
    assert "inference.GRPCInferenceService" in names and "rnnserve.v1.Inference" in names


def test_a_forecast_batch_takes_one_max_calls_slot(model_repo) -> None:
    """Each row took a --max-calls slot: a batch wider than the limit was refused (429 "retry
    later") however idle the server. A batch is one call, as a Score of many texts."""
    from tests.integration.http.conftest import http_server

    srv = http_server(model_repo, max_calls=2)
    try:
        stub = kpb_grpc.GRPCInferenceServiceStub(srv.channel)
        request = kpb.ModelInferRequest(model_name="sine-gru")
        rows = [[0.0, 0.5, 0.9, 1.0]] * 4
        h = request.inputs.add(name="history", datatype="FP32", shape=[4, 4])
        h.contents.fp32_contents.extend(v for row in rows for v in row)
        k = request.inputs.add(name="horizon", datatype="INT64", shape=[1])
        k.contents.int64_contents.append(3)
        got = stub.ModelInfer(request, timeout=30)
        assert list(got.outputs[0].shape) == [4, 3]
        assert srv.app.engine.calls.active == 0  # the slot is given back
    finally:
        srv.stop()


def test_a_reply_over_max_message_bytes_is_sent(model_repo) -> None:
    """Replies were capped at --max-message-bytes too: a forecast batch of 16 rows x horizon
    1000 (192 kB) did all its work, then failed RESOURCE_EXHAUSTED "Sent message larger than
    max", logged as an ERROR and counted OK. The limit is the request's."""
    from tests.integration.http.conftest import http_server

    srv = http_server(model_repo, max_message_bytes=65536)
    try:
        stub = kpb_grpc.GRPCInferenceServiceStub(srv.channel)
        request = kpb.ModelInferRequest(model_name="sine-gru")
        h = request.inputs.add(name="history", datatype="FP32", shape=[16, 4])
        h.contents.fp32_contents.extend([0.0, 0.5, 0.9, 1.0] * 16)
        k = request.inputs.add(name="horizon", datatype="INT64", shape=[1])
        k.contents.int64_contents.append(1000)
        got = stub.ModelInfer(request, timeout=60)
        assert got.ByteSize() > 65536 and list(got.outputs[0].shape) == [16, 1000]
    finally:
        srv.stop()


def test_an_output_asked_twice_is_refused(kserve) -> None:
    """Two `perplexity` outputs came back as two copies (an input given twice is refused,
    and Triton refuses either); now INVALID_ARGUMENT naming it."""
    request = _score_request([b"the time"])
    request.outputs.add(name="perplexity")
    request.outputs.add(name="perplexity")
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "outputs: 'perplexity' is asked twice"


def test_model_metadata_lists_only_versions_that_serve(model_repo, tmp_path) -> None:
    """ModelMetadata's `versions` listed a version that failed to load (NOT_SERVING) first,
    so a Triton client that took versions[0] was refused. Triton lists its ready versions;
    now so does this server, over gRPC and REST. Asked by number, the broken version is
    UNAVAILABLE, as Triton says of a version "not at ready state"."""
    import json
    import shutil
    import urllib.request

    from tests.integration.http.conftest import http_server

    shutil.copytree(model_repo / "lstm" / "1", tmp_path / "lstm" / "1")
    shutil.copytree(model_repo / "lstm" / "1", tmp_path / "lstm" / "2")
    (tmp_path / "lstm" / "2" / "model.onnx").write_bytes(b"not a model")  # sha256 differs
    srv = http_server(tmp_path)
    try:
        stub = kpb_grpc.GRPCInferenceServiceStub(srv.channel)
        for version in ("", "1"):
            ask = kpb.ModelMetadataRequest(name="lstm", version=version)
            assert list(stub.ModelMetadata(ask, timeout=10).versions) == ["1"]
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelMetadata(kpb.ModelMetadataRequest(name="lstm", version="2"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        url = f"http://127.0.0.1:{srv.app.http.port}/v2/models/lstm"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert json.loads(reply.read())["versions"] == ["1"]
        info = srv.stub.GetModel(pb.GetModelRequest(model="lstm"), timeout=10)
        assert [v.status for v in info.versions] == ["NOT_SERVING", "SERVING"]  # still told
    finally:
        srv.stop()
