"""Provider fall-back and the state helpers used to batch streams."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from rnnserve.artifact.manifest import StateSpec
from rnnserve.server.runtime import OnnxModel, _init_element, log_softmax, resolve_providers


def test_unavailable_provider_falls_back_to_cpu_with_a_log_line(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        chosen = resolve_providers(["nosuchgpu", "cpu"])
    assert chosen == ["CPUExecutionProvider"]
    assert "nosuchgpu" in caplog.text
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert resolve_providers(["cuda"]) == ["CPUExecutionProvider"]


class _States(OnnxModel):
    def __init__(self, specs: list[StateSpec]) -> None:
        self.specs = specs
        self._init = [_init_element(s) for s in specs]


def test_init_broadcast_concat_and_take_along_the_batch_axis() -> None:
    specs = [
        StateSpec("h", "h_in", "h_out", [2, -1, 3], 1, init=0.5),
        StateSpec("ctx", "c_in", "c_out", [-1, 2], 0, dtype="int64", init=[2, 2]),
    ]
    m = _States(specs)
    a, b = m.initial_state(2), m.initial_state(1)
    assert a[0].shape == (2, 2, 3) and np.all(a[0] == 0.5)
    assert a[1].dtype == np.int64 and a[1].tolist() == [[2, 2], [2, 2]]
    b[0][:] = 7.0
    joined = m.concat([a, b])
    assert joined[0].shape == (2, 3, 3) and joined[1].shape == (3, 2)
    row = m.take(joined, 2)
    assert np.all(row[0] == 7.0) and row[0].shape == (2, 1, 3)
    assert [s[0].shape for s in m.split(joined)] == [(2, 1, 3)] * 3


def test_log_softmax_normalises() -> None:
    lp = log_softmax(np.asarray([[1000.0, 1000.0, -5.0]], dtype=np.float32))
    assert np.allclose(np.exp(lp).sum(-1), 1.0)
    assert np.isfinite(lp).all()


def test_observe_many_records_what_observe_records() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from rnnserve.server.metrics import LATENCY_BUCKETS, observe_many

    values = [0.00005, 0.0001, 0.0003, 0.0003, 0.002, 7.0, 100.0, 0.0]
    exposed = []
    for record in ("one by one", "at once"):
        registry = CollectorRegistry()
        h = Histogram("t_seconds", "t", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        child = h.labels(model="m")
        if record == "at once":
            observe_many(child, values)
        else:
            for v in values:
                child.observe(v)
        lines = generate_latest(registry).decode().splitlines()
        exposed.append([line for line in lines if "created" not in line])
    assert exposed[0] == exposed[1]
    assert 't_seconds_bucket{le="0.0001",model="m"} 3.0' in exposed[1]  # bounds inclusive


def test_a_head_that_cannot_load_leaves_the_model_serving_in_numpy(monkeypatch, tmp_path) -> None:
    """The decode head is an optimisation: if ONNX Runtime refuses it, the model still loads
    (tokens are then picked in numpy)."""
    from rnnserve.server import decode_head, runtime

    path, manifest = _table_lm(tmp_path, np.eye(3))
    model = runtime.OnnxModel(path, manifest, ["CPUExecutionProvider"], 1)
    assert model.has_head
    assert decode_head.TOKEN in {o.name for o in model.session.get_outputs()}

    real = ort.InferenceSession

    def refuse_heads(source, *args, **kwargs):
        if decode_head.PREFIX.encode() in source:
            raise RuntimeError("this provider cannot run the head")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", refuse_heads)
    model = runtime.OnnxModel(path, manifest, ["CPUExecutionProvider"], 1)
    assert not model.has_head
    logits, _ = model.run(np.array([[1]]), [])
    assert logits.shape == (1, 1, 3)


def test_a_model_file_replaced_since_loading_is_refused_where_it_is_opened_again(
    tmp_path,
) -> None:
    """The decode process opens the model again (from the server's copy of the loaded bytes,
    OnnxModel(copy, *model.args[1:])): the digest taken at loading goes with it, so bytes
    other than the loaded ones are refused there."""
    import pytest

    from rnnserve.server import runtime

    path, manifest = _table_lm(tmp_path, np.eye(3))
    loaded = runtime.OnnxModel(path, manifest, ["CPUExecutionProvider"], 1)
    assert runtime.OnnxModel(*loaded.args).args == loaded.args  # unchanged: opens again
    _table_lm(tmp_path, 2 * np.eye(3))  # replaced in place
    with pytest.raises(runtime.ModelChanged, match="changed since the server loaded"):
        runtime.OnnxModel(*loaded.args)


def _table_lm(tmp_path, table):
    """A one-Gather lm graph at tmp_path/m.onnx and a bare manifest for it."""
    from onnx import TensorProto, helper, numpy_helper, save

    from rnnserve.artifact.manifest import Manifest

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "tokens"], ["logits"], axis=0)],
        "table_lm",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "time", 3])],
        [numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    manifest = Manifest.__new__(Manifest)
    manifest.task, manifest.output_name, manifest.input_name = "lm", "logits", "tokens"
    manifest.state, manifest.vocab, manifest.onnx_sha256 = [], ["a", "b", "c"], ""
    return tmp_path / "m.onnx", manifest


def test_the_manifest_sha256_is_checked_on_the_bytes_the_sessions_are_built_from(
    tmp_path, monkeypatch
) -> None:
    """The file was read four times (the repository's digest, the digest for the decode
    process, the session, the decode head's graph): a file replaced between two reads passed
    the check and served other weights. Now one read feeds all of them."""
    import pytest

    from rnnserve.artifact.manifest import ManifestError, sha256_file
    from rnnserve.server import runtime

    path, manifest = _table_lm(tmp_path, np.eye(3))
    manifest.onnx_sha256 = sha256_file(path).upper()  # Get-FileHash writes capitals
    sources = []
    real = ort.InferenceSession

    def record(source, *args, **kwargs):
        sources.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", record)
    monkeypatch.setattr(runtime.onnx, "load", lambda *a, **k: pytest.fail("read by path"))
    model = runtime.OnnxModel(path, manifest, ["CPUExecutionProvider"], 1)
    assert model.has_head and [type(s) for s in sources] == [bytes, bytes]
    manifest.onnx_sha256 = "0" * 64
    with pytest.raises(ManifestError, match="does not match the manifest's"):
        runtime.OnnxModel(path, manifest, ["CPUExecutionProvider"], 1)
