"""Findings of a security review, as regressions.

Resume tokens a key holder could craft (a replica of another release, a leaked key) must be
a BadRequest on `state`, never an unhandled error (INTERNAL, a traceback per call); a
model.onnx whose tensors keep their data in another file must never reach onnxruntime,
which reads that file relative to the server's working directory (`/` in the image).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rnnserve.artifact.external_data import (
    ExternalDataError,
    check_self_contained,
    refuse_external,
)
from rnnserve.artifact.manifest import StateSpec
from rnnserve.server.errors import BadRequest
from rnnserve.server.resume import StateSigner

KEY = b"0123456789abcdef0123456789abcdef"
SPECS = [StateSpec("h", "h_in", "h_out", [1, -1, 3], 1)]
NOW = 1_800_000_000


def _signed(header: dict | bytes, payload: bytes, version: int = 2) -> bytes:
    """A token with a valid signature over whatever header: what a key holder can send."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = struct.pack(">2sBI", b"RS", version, len(head)) + head + payload
    return body + hmac.new(KEY, body, hashlib.sha256).digest()


def _genuine() -> tuple[dict, bytes]:
    state = [np.zeros((1, 1, 3), np.float32)]
    token = StateSigner(KEY, clock=lambda: NOW).sign("lstm", "1", state, 5)
    length = struct.unpack_from(">I", token, 3)[0]
    return json.loads(token[7 : 7 + length]), token[7 + length : -32]


def _crafted() -> list[tuple[str, bytes]]:
    header, payload = _genuine()
    deep = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    progress = {"tokens": 1e400, "max_tokens": 9, "seed": 1, "uniforms": 0, "held": "",
                "temperature": 1.0, "top_k": 0, "top_p": 0.0, "stop": []}  # fmt: skip
    return [
        ("last_token is infinite", _signed({**header, "last_token": 1e400}, payload)),
        ("iat has 400 digits", _signed({**header, "iat": 10**400}, payload)),
        ("iat is 400 digits in the past", _signed({**header, "iat": -(10**400)}, payload)),
        ("a version 1 header nests too deep", _signed(deep, payload, version=1)),
        ("progress.tokens is infinite", _signed({**header, "stream": progress}, payload)),
    ]


@pytest.mark.parametrize("token", [t for _, t in _crafted()], ids=[n for n, _ in _crafted()])
def test_a_crafted_token_with_a_valid_signature_is_a_bad_request(token: bytes) -> None:
    """Each raised OverflowError or RecursionError: INTERNAL, a traceback logged per call."""
    signer = StateSigner(KEY, max_age=3600, clock=lambda: NOW)
    with pytest.raises(BadRequest) as err:
        signer.verify(token, "lstm", "1", SPECS, vocab_size=10)
    assert err.value.field == "state"


# -- model.onnx with external data ---------------------------------------------------------------
def _external(name: str, location: str) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _model(nodes, initializers=(), sparse=()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("Y", TensorProto.UINT8, [4])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=list(initializers))
    graph.sparse_initializer.extend(sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _in_initializer(location: str) -> onnx.ModelProto:
    return _model([helper.make_node("Identity", ["W"], ["Y"])], [_external("W", location)])


def _in_constant(location: str) -> onnx.ModelProto:
    node = helper.make_node("Constant", [], ["Y"])
    node.attribute.append(helper.make_attribute("value", _external("c", location)))
    return _model([node])


def _in_subgraph(location: str) -> onnx.ModelProto:
    out = helper.make_tensor_value_info("Y", TensorProto.UINT8, [4])
    branch = helper.make_graph([helper.make_node("Identity", ["W"], ["Y"])], "b", [], [out])
    branch.initializer.append(_external("W", location))
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    node = helper.make_node("If", ["cond"], ["Y"], then_branch=branch, else_branch=branch)
    return _model([node], [cond])


def _in_sparse(location: str) -> onnx.ModelProto:
    indices = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    sparse = helper.make_sparse_tensor(_external("S", location), indices, [4])
    return _model([helper.make_node("Identity", ["S"], ["Y"])], sparse=[sparse])


def _in_function_default(location: str) -> onnx.ModelProto:
    """A model-local function whose Constant takes its value from an attribute default, which
    onnxruntime copies in when it inlines the call: the first walk of known places missed it."""
    const = helper.make_node("Constant", [], ["y"])
    ref = onnx.AttributeProto(name="value", ref_attr_name="v", type=onnx.AttributeProto.TENSOR)
    const.attribute.append(ref)
    function = helper.make_function(
        "local", "Leak", [], ["y"], [const], [helper.make_opsetid("", 17)]
    )
    function.attribute_proto.append(helper.make_attribute("v", _external("c", location)))
    model = _model([helper.make_node("Leak", [], ["Y"], domain="local")])
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.append(function)
    return model


@pytest.mark.parametrize(
    "build", [_in_initializer, _in_constant, _in_subgraph, _in_sparse, _in_function_default]
)
@pytest.mark.parametrize("location", ["etc/hostname", "../../secret", "/etc/hostname"])
def test_external_data_anywhere_in_the_graph_is_refused(build, location: str) -> None:
    with pytest.raises(ExternalDataError, match=r"outside model\.onnx"):
        refuse_external(build(location).SerializeToString())


def test_a_self_contained_graph_passes(tmp_path: Path) -> None:
    weights = helper.make_tensor("W", TensorProto.UINT8, [8], b"location", raw=True)
    model = _model([helper.make_node("Identity", ["W"], ["Y"])], [weights])
    check_self_contained(model.SerializeToString())  # holds "location": parsed, nothing external
    check_self_contained(b"")


def test_onnxruntime_reads_a_file_outside_the_package_without_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The threat itself: a session built from a package's bytes (as the server builds it)
    reads a file named relative to the working directory. If onnxruntime ever stops doing
    so, this test says the check guards against nothing new."""
    (tmp_path / "secret").write_bytes(b"KEY!")
    package = tmp_path / "models" / "evil" / "1"
    package.mkdir(parents=True)
    (package / "model.onnx").write_bytes(_in_initializer("secret").SerializeToString())
    monkeypatch.chdir(tmp_path)
    data = (package / "model.onnx").read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (leaked,) = session.run(None, {"X": np.zeros(1, np.float32)})
    assert bytes(leaked) == b"KEY!"
    with pytest.raises(ExternalDataError):
        check_self_contained(data)
    assert os.getcwd() == str(tmp_path)


def test_the_server_never_hands_such_a_package_to_onnxruntime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check runs on the bytes the session would be built from, before onnxruntime: a
    repository scan marks the version NOT_SERVING with the reason."""
    from rnnserve.server import runtime
    from rnnserve.server.repository import Repository

    version = tmp_path / "evil" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(_in_initializer("etc/hostname").SerializeToString())
    manifest = {
        "format_version": 1, "name": "evil", "version": "1", "task": "lm",
        "architecture": "rnn", "inputs": {"name": "tokens"}, "outputs": {"name": "logits"},
        "state": [], "tokenizer": {"level": "char"},
        "vocab": ["<unk>", "<pad>", "<bos>", "<eos>", "a"],
    }  # fmt: skip
    (version / "manifest.json").write_text(json.dumps(manifest))
    built: list[object] = []

    def session(*args, **kwargs):  # stands in for onnxruntime: what it would be given
        built.append(args)
        raise RuntimeError("onnxruntime was given the package")

    monkeypatch.setattr(runtime.ort, "InferenceSession", session)
    repository = Repository(
        tmp_path, lambda path, man: runtime.OnnxModel(path, man, ["CPUExecutionProvider"], 1)
    )
    report = repository.scan()
    assert built == []
    (failed,) = report.failed
    assert failed.startswith("evil/1: ") and "outside model.onnx" in failed
    assert "etc/hostname" in repository.get_any("evil", "1").reason
