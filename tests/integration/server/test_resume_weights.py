"""A resume token is bound to the weights that made it, not only to the model's name and
version: a replica whose `lstm/1` is another export (a version number reused during a
rolling update) refuses a checkpoint made elsewhere with FAILED_PRECONDITION, instead of
continuing the stream on other weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import grpc
import onnx
import pytest

from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings


def _another_export(src: Path, dst: Path) -> None:
    """The same package with other bytes (a doc string stands for retrained weights), its
    manifest's digest updated as the exporter writes it."""
    shutil.copytree(src, dst)
    graph = onnx.load(str(dst / "model.onnx"))
    graph.doc_string = "another export"
    onnx.save(graph, str(dst / "model.onnx"))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["onnx_sha256"] = hashlib.sha256((dst / "model.onnx").read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_a_checkpoint_is_refused_by_other_weights_under_its_version(
    model_repo: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    shutil.copytree(model_repo / "lstm", first / "lstm")
    _another_export(model_repo / "lstm" / "1", second / "lstm" / "1")
    a = ServerThread(make_settings(first, state_key="k")).start()
    b = ServerThread(make_settings(second, state_key="k")).start()
    try:
        request = pb.GenerateRequest(model="lstm", prompt="the time", max_tokens=12,
                                     state_every=4)  # fmt: skip
        checkpoint = next(m.state for m in a.stub.Generate(request, timeout=30) if m.state)
        more = pb.GenerateRequest(model="lstm", max_tokens=12, state=checkpoint)
        assert list(a.stub.Generate(more, timeout=30))  # its own replica continues it
        with pytest.raises(grpc.RpcError) as err:
            list(b.stub.Generate(more, timeout=30))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "other weights of lstm/1" in err.value.details()
    finally:
        a.stop()
        b.stop()
