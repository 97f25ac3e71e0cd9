"""KServe v2 as Triton answers it: model metadata and infer of a model or version that does
not serve are the same error (not a 200 listing no version, nor infer's FAILED_PRECONDITION),
and a request's `parameters.timeout` (microseconds) is its deadline; `priority` is accepted,
and ignored. REST and gRPC alike."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from rnnserve.kserve import grpc_predict_v2_pb2 as kpb
from rnnserve.kserve import grpc_predict_v2_pb2_grpc as kpb_grpc
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.http.conftest import http_server
from tests.integration.http.eos_model import NAME, build_repo
from tests.integration.server.harness import ServerThread

DEADLINE = "the call's deadline passed"  # what Generate says past its gRPC deadline


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """`eos` serves version 1 and has a broken version 2; `broken` has only a broken 1."""
    repo = build_repo(tmp_path_factory.mktemp("kserve") / "models")
    shutil.copytree(repo / NAME / "1", repo / NAME / "2")
    shutil.copytree(repo / NAME / "1", repo / "broken" / "1")
    for bad in (repo / NAME / "2", repo / "broken" / "1"):
        (bad / "model.onnx").write_bytes(b"not a model")  # its sha256 differs: NOT_SERVING
    srv = http_server(repo)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def kserve(server: ServerThread) -> kpb_grpc.GRPCInferenceServiceStub:
    return kpb_grpc.GRPCInferenceServiceStub(server.channel)


def _rest(server: ServerThread, path: str, body: object | None = None) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{server.app.http.port}{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_metadata_of_a_model_with_no_serving_version_is_not_found(server, kserve) -> None:
    """It was 200 with `versions: []`; Triton's GetModel answers NOT_FOUND "'broken' has no
    available versions" (HTTP 404) when no version is ready."""
    status, body = _rest(server, "/v2/models/broken")
    assert status == 404 and "has no available versions" in body["error"]
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelMetadata(kpb.ModelMetadataRequest(name="broken"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == body["error"]
    assert _rest(server, "/v2/models/nothing")[0] == 404  # unknown: as before


def test_metadata_of_a_named_version_that_does_not_serve_is_unavailable(server, kserve) -> None:
    """Triton: UNAVAILABLE (HTTP 503) "version 2 is not at ready state"; it answered 200 and
    listed version 1. A named version that serves lists itself alone, as Triton does."""
    status, body = _rest(server, f"/v2/models/{NAME}/versions/2")
    assert status == 503 and "'2' is not at ready state" in body["error"]
    assert "sha256" in body["error"]  # the load's reason, as GetModel's status_reason
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelMetadata(kpb.ModelMetadataRequest(name=NAME, version="2"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for path in (f"/v2/models/{NAME}", f"/v2/models/{NAME}/versions/1"):
        status, body = _rest(server, path)
        assert status == 200 and body["versions"] == ["1"]
        assert [i["name"] for i in body["inputs"]] == ["text"]
    assert _rest(server, f"/v2/models/{NAME}/versions/9")[0] == 404


@pytest.mark.parametrize(
    ("name", "version", "http", "code"),
    [
        ("broken", "", 404, grpc.StatusCode.NOT_FOUND),  # "has no available versions"
        (NAME, "2", 503, grpc.StatusCode.UNAVAILABLE),  # "version '2' is not at ready state"
    ],
)
def test_infer_and_ready_look_the_model_up_as_metadata_does(
    server, kserve, name: str, version: str, http: int, code: grpc.StatusCode
) -> None:
    """Triton's infer uses its metadata's model lookup; here infer still answered
    FAILED_PRECONDITION (400) "is NOT_SERVING" where metadata said 404 / 503. Now both
    transports answer infer with metadata's status and message, and ModelReady says false
    (REST 400). The rnnserve.v1 answer is unchanged (client/failover.py reads it)."""
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
    status, metadata = _rest(server, path)
    assert status == http
    assert _rest(server, path + "/infer", _infer_body()) == (http, metadata)
    assert _rest(server, path + "/ready") == (400, {"name": name, "ready": False})
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(_grpc_request(name=name, version=version), timeout=30)
    assert (err.value.code(), err.value.details()) == (code, metadata["error"])
    ask = kpb.ModelReadyRequest(name=name, version=version)
    assert not kserve.ModelReady(ask, timeout=10).ready
    with pytest.raises(grpc.RpcError) as err:
        score = pb.ScoreRequest(model=name, version=version, texts=["abcde"])
        server.stub.Score(score, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_infer_of_the_serving_version_still_answers(server, kserve) -> None:
    """Beside the broken version 2, version 1 serves: asked by number or not, it answers."""
    for path in (f"/v2/models/{NAME}", f"/v2/models/{NAME}/versions/1"):
        status, body = _rest(server, path + "/infer", _infer_body())
        assert status == 200 and body["model_version"] == "1"
        assert _rest(server, path + "/ready")[0] == 200
    for version in ("", "1"):
        reply = kserve.ModelInfer(_grpc_request(version=version), timeout=30)
        assert reply.model_version == "1"


def _infer_body(**parameters: object) -> dict:
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["abcde"]}
    return {"inputs": [text], "parameters": parameters}


def _grpc_request(
    name: str = NAME, version: str = "", **parameters: kpb.InferParameter
) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=name, model_version=version)
    t = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"abcde")
    for key, value in parameters.items():
        request.parameters[key].CopyFrom(value)
    return request


def test_parameters_timeout_is_the_deadline(server, kserve) -> None:
    """`timeout` (Triton: microseconds) was ignored: a call past it ran on. Now it ends the
    call as a gRPC deadline does: DEADLINE_EXCEEDED, HTTP 504, Generate's message."""
    path = f"/v2/models/{NAME}/infer"
    assert _rest(server, path, _infer_body(timeout=1)) == (504, {"error": DEADLINE})
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(_grpc_request(timeout=kpb.InferParameter(int64_param=1)), timeout=30)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE)
    # time enough, or 0 (Triton's "none"), or a priority (accepted, ignored): answered
    for params in ({"timeout": 30_000_000}, {"timeout": 0}, {"priority": 2, "timeout": 10**7}):
        status, body = _rest(server, path, _infer_body(**params))
        assert status == 200 and body["outputs"][0]["name"] == "perplexity"
    long = kpb.InferParameter(uint64_param=30_000_000)  # tritonclient may send either int
    assert kserve.ModelInfer(_grpc_request(timeout=long), timeout=30).model_version == "1"
    # a bad input is told as such, not hidden behind the deadline
    bad = {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}],
           "parameters": {"timeout": 1}}  # fmt: skip
    assert _rest(server, path, bad)[0] == 400


@pytest.mark.parametrize("key", ["timeout", "priority"])
@pytest.mark.parametrize("value", [-1, 1.5, "1000", True, 10**400])
def test_timeout_and_priority_must_be_non_negative_integers(server, key, value) -> None:
    status, body = _rest(server, f"/v2/models/{NAME}/infer", _infer_body(**{key: value}))
    assert status == 400 and body["error"].startswith(f"parameters.{key}: ")


def test_grpc_refuses_a_timeout_that_is_no_integer(kserve) -> None:
    for value in (kpb.InferParameter(string_param="1s"), kpb.InferParameter(double_param=1.5)):
        with pytest.raises(grpc.RpcError) as err:
            kserve.ModelInfer(_grpc_request(timeout=value), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("parameters.timeout: must be an integer")
