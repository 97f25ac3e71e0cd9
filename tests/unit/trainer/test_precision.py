"""int8 and fp16 exports: ORT's own tooling, float32 at the graph's edges, the quality check."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rnnserve.artifact.manifest import Manifest, ManifestError
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import Vocab
from rnnserve.trainer import precision
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.export import export_model
from rnnserve.trainer.exportable import state_from_spec
from rnnserve.trainer.models import ModelConfig, build_model
from rnnserve.trainer.precision_cli import add_arguments, options

VOCAB = Vocab.build(list("the time machine by h g wells"))
TEXT = VOCAB.encode(list("the time traveller for so it will be convenient to speak of him " * 4))


def _export(arch: str, out: Path, layers: int = 1, bi: bool = False, **kw) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch, len(VOCAB), 16, layers, 8, bi))
    return export_model(
        model, out, name=f"{arch}{layers}{'bi' if bi else ''}", vocab=VOCAB,
        tokenizer=TokenizerConfig(), probe=TEXT, probe_source="test text", **kw,
    )  # fmt: skip


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path / "model.onnx")).graph.node}


def _io_types(path: Path) -> set[int]:
    graph = onnx.load(str(path / "model.onnx")).graph
    return {v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}


def test_int8_lstm_uses_the_quantized_lstm_kernel(tmp_path) -> None:
    path = _export("lstm", tmp_path, layers=2, precision="int8")
    manifest = Manifest.load(path)
    assert manifest.precision == "int8"
    assert manifest.quantization["tool"] == "onnxruntime.quantization.quantize_dynamic"
    assert manifest.quantization["per_channel"] is True
    assert "DynamicQuantizeLSTM" in _ops(path) and "LSTM" not in _ops(path)
    assert "MatMulInteger" in _ops(path)  # the output projection
    assert manifest.quantization["kept_float32"] == []
    assert manifest.quantization["embedding"]["int8"] is False  # a char table: kilobytes
    assert "DequantizeLinear" not in _ops(path)
    check = manifest.parity["precision"]
    assert check["precision"] == "int8" and check["probe"].startswith("test text")
    assert check["step_vs_window_max_abs_diff"] <= precision.STEP_TOL["int8"]
    assert check["perplexity_change"] <= precision.PPL_BOUND
    assert manifest.parity["ok"] is True  # the fp32 graph's check against torch still ran
    assert _io_types(path) <= {onnx.TensorProto.INT64, onnx.TensorProto.FLOAT}


def test_int8_quantizes_an_embedding_table_from_the_size_where_it_pays(
    tmp_path, monkeypatch
) -> None:
    """A table of EMBEDDING_INT8_MIN_BYTES or more (word level) is stored int8 and dequantized
    after the lookup; smaller ones stay float32 (above)."""
    monkeypatch.setattr(precision, "EMBEDDING_INT8_MIN_BYTES", 64)
    path = _export("lstm", tmp_path, precision="int8")
    embedding = Manifest.load(path).quantization["embedding"]
    assert embedding["int8"] is True and embedding["bytes_float32"] >= 64
    assert "DequantizeLinear" in _ops(path)
    assert Manifest.load(path).parity["precision"]["perplexity_change"] <= precision.PPL_BOUND


@pytest.mark.parametrize(("arch", "kept"), [("gru", ["GRU"]), ("rnn", ["RNN"])])
def test_int8_gru_and_rnn_keep_their_recurrence_in_float32(tmp_path, arch, kept) -> None:
    """ORT's quantizer has no GRU/RNN kernels: only the projection around them is int8."""
    path = _export(arch, tmp_path, precision="int8")
    manifest = Manifest.load(path)
    assert manifest.quantization["kept_float32"] == kept
    assert "MatMulInteger" in _ops(path)


def test_int8_bidirectional_infill_model_exports(tmp_path) -> None:
    path = _export("lstm", tmp_path, bi=True, precision="int8")
    manifest = Manifest.load(path)
    assert manifest.task == "infill" and manifest.precision == "int8"
    assert "perplexity_change" in manifest.parity["precision"]


def test_fp16_keeps_inputs_outputs_and_state_float32(tmp_path) -> None:
    path = _export("lstm", tmp_path, precision="fp16")
    manifest = Manifest.load(path)
    assert manifest.precision == "fp16"
    assert _io_types(path) <= {onnx.TensorProto.INT64, onnx.TensorProto.FLOAT}
    inits = onnx.load(str(path / "model.onnx")).graph.initializer
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in inits)
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"tokens": np.asarray([TEXT[:5]], np.int64)}
    feed.update({s.input: state_from_spec(s, 1) for s in manifest.state})
    logits, *state = session.run(None, feed)
    assert logits.dtype == np.float32 and all(s.dtype == np.float32 for s in state)


def test_a_perplexity_rise_above_the_bound_is_refused_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "PPL_BOUND", -1.0)  # every graph now "loses" quality
    with pytest.raises(TrainerError, match=r"allow-quality-loss"):
        _export("lstm", tmp_path, precision="int8")
    assert not (tmp_path / "lstm1").exists() or not any((tmp_path / "lstm1").iterdir())
    path = _export("lstm", tmp_path, precision="int8", allow_quality_loss=True)
    assert Manifest.load(path).parity["precision"]["quality_override"] is True


def test_perplexity_is_measured_on_the_given_rows() -> None:
    """A uniform model's perplexity is the vocabulary size: the measurement is not a stub."""
    rows = precision.text_rows(TEXT)
    assert rows.shape[0] >= 2 and rows.size <= len(TEXT)

    class Uniform:
        specs = ()

        def run(self, x, state):
            return np.zeros((*x.shape, 7), np.float32), []

    assert precision.perplexity(Uniform(), rows % 7, "lm") == pytest.approx(7.0)  # type: ignore[arg-type]


def test_older_manifests_read_as_fp32_and_unknown_precisions_are_refused(tmp_path) -> None:
    path = _export("rnn", tmp_path)
    data = json.loads((path / "manifest.json").read_text())
    assert data["precision"] == "fp32"
    del data["precision"], data["quantization"]
    assert Manifest.from_dict(data).precision == "fp32"
    with pytest.raises(ManifestError, match="precision"):
        Manifest.from_dict({**data, "precision": "int4"})


def test_cli_flags_map_to_export_options() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--precision", "int8", "--per-tensor"])
    assert options(args) == {"precision": "int8", "per_channel": False, "allow_quality_loss": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "int4"])


def test_a_graph_that_hangs_onnx_runtime_is_one_error_line(tmp_path, monkeypatch) -> None:
    """A child that never finishes loading the converted graph is a TrainerError naming the
    wait, not a TimeoutExpired traceback."""
    import rnnserve.trainer.precision as precision

    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs["timeout"])

    monkeypatch.setattr(precision.subprocess, "run", hang)
    with pytest.raises(TrainerError, match=r"did not load within 300 s"):
        precision._loads_in_child(tmp_path / "g.onnx", "int8")
