"""Findings of a security review, end to end on an in-process server.

1. A model package whose graph keeps a tensor in an "external data" file: onnxruntime, given
   the package's bytes, reads that file relative to the server's working directory, and a
   graph feeding it to an output hands the file to every caller. It must be NOT_SERVING.
2. A resume token with a valid signature over a crafted header (a key holder) must be
   INVALID_ARGUMENT, never INTERNAL.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import struct
from pathlib import Path

import grpc
import onnx
import pytest
from onnx import TensorProto, helper

from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings

SECRET = b"S"  # one byte: the graph below leaks byte 0 of the file as the forecast


def _leaky_package(source: Path, target: Path, location: str) -> None:
    """sine-mlp with its prediction replaced by byte 0 of the file at `location`."""
    model = onnx.load(str(source / "model.onnx"))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["original" if o == "prediction" else o for o in node.output]
    leaked = TensorProto(name="leaked", data_type=TensorProto.UINT8, dims=[1])
    leaked.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "1")):
        entry = leaked.external_data.add()
        entry.key, entry.value = key, value
    graph.initializer.extend([leaked, helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    graph.node.extend(
        [
            helper.make_node("Cast", ["leaked"], ["leaked_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["original", "zero"], ["nothing"]),
            helper.make_node("Add", ["nothing", "leaked_f"], ["prediction"]),
        ]
    )
    data = model.SerializeToString()
    target.mkdir(parents=True)
    (target / "model.onnx").write_bytes(data)
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["onnx_sha256"] = hashlib.sha256(data).hexdigest()
    (target / "manifest.json").write_text(json.dumps(manifest))


def test_a_package_reading_a_file_outside_it_is_not_served(
    model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix the forecast was byte 0 of `secret.txt`, denormalised: SERVING."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "sine-mlp", repo / "sine-mlp")
    _leaky_package(model_repo / "sine-mlp" / "1", repo / "leaky" / "1", "secret.txt")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)  # the image runs in `/`: "etc/passwd" would do the same
    server = ServerThread(make_settings(repo)).start()
    try:
        history = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Forecast(pb.ForecastRequest(model="leaky", history=history, horizon=1))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "outside model.onnx" in err.value.details()
        info = server.stub.GetModel(pb.GetModelRequest(model="leaky"))
        assert info.versions[0].status_reason.startswith(
            "tensor 'leaked' (model.graph.initializer) keeps its data"
        )
        # the rest of the repository serves
        ok = server.stub.Forecast(pb.ForecastRequest(model="sine-mlp", history=history, horizon=1))
        assert len(ok.forecast) == 1
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(model_repo: Path):
    srv = ServerThread(make_settings(model_repo, state_max_age=3600)).start()
    yield srv
    srv.stop()


def _resign(token: bytes, key: bytes, change) -> bytes:
    length = struct.unpack_from(">I", token, 3)[0]
    header = json.loads(token[7 : 7 + length])
    payload = token[7 + length : -32]
    head = change(header)
    head = head if isinstance(head, bytes) else json.dumps(head).encode()
    version = 1 if head is DEEP else 2
    body = struct.pack(">2sBI", b"RS", version, len(head)) + head + payload
    return body + hmac.new(key, body, hashlib.sha256).digest()


DEEP = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # a version 1 header
CHANGES = {
    "last_token infinite": lambda h: {**h, "last_token": 1e400},
    "iat of 400 digits": lambda h: {**h, "iat": 10**400},
    "version 1, nested 100,000 deep": lambda h: DEEP,
}


@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
def test_a_validly_signed_crafted_token_is_invalid_argument(server: ServerThread, change) -> None:
    first = list(server.stub.Generate(pb.GenerateRequest(model="lstm", prompt="the", max_tokens=2,
                                                         return_state=True)))  # fmt: skip
    key = server.settings.state_key.strip().encode()
    token = _resign(first[-1].state, key, change)
    request = pb.GenerateRequest(model="lstm", prompt="x", max_tokens=2, state=token)
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub.Generate(request))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith("state: resume token ")
