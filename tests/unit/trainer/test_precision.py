"""int8 and fp16 exports: ORT's own tooling, float32 at the graph's edges, the quality check."""

from __future__ import annotations

import json
import math
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


def _table_graph(path: Path, table: np.ndarray) -> Path:
    """A stateless token graph: logits[b, t] = table[tokens[b, t]] (symbolic batch and time)."""
    from onnx import helper, numpy_helper

    vocab = table.shape[1]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "tokens"], ["logits"], axis=0)], "table",
        [helper.make_tensor_value_info("tokens", onnx.TensorProto.INT64, ["batch", "time"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT,
                                       ["batch", "time", vocab])],
        [numpy_helper.from_array(table.astype(np.float32), "table")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _check_tables(tmp_path: Path, want: np.ndarray, got: np.ndarray, **kw) -> dict:
    from rnnserve.trainer.graph_check import OrtGraph
    from rnnserve.trainer.probe import Probe

    ref = OrtGraph(_table_graph(tmp_path / "ref.onnx", want), "tokens", "logits", [])
    path = _table_graph(tmp_path / "got.onnx", got)
    x = np.tile(np.arange(want.shape[0], dtype=np.int64), (2, 4))
    return precision.check_precision(
        ref, OrtGraph(path, "tokens", "logits", []), path, precision="fp16", task="infill",
        probe=Probe(x, "test rows"), rows=x, **kw,
    )  # fmt: skip


def test_a_graph_that_computes_nan_is_refused_even_with_allow_quality_loss(tmp_path) -> None:
    """NaN log-probabilities made the perplexity change NaN, and `NaN > bound` is False: a
    stateless (infill) graph that computes NaN passed the check and was published."""
    want = np.random.default_rng(0).standard_normal((6, 6))
    got = want.copy()
    got[2] = np.nan
    for allow in (False, True):
        with pytest.raises(TrainerError, match=r"fp16 check failed: .*NaN"):
            _check_tables(tmp_path, want, got, allow_quality_loss=allow)


def test_a_perplexity_past_the_float_range_is_a_record_not_a_traceback(tmp_path) -> None:
    """A probe the fp32 model finds absurdly unlikely (mean log-probability below -709) raised
    OverflowError from math.exp; the change is measured in log space instead."""
    table = np.where(np.eye(6, dtype=bool), -3e4, 0.0)  # each token itself: log-prob ~ -3e4
    record = _check_tables(tmp_path, table, table)
    assert record["perplexity_fp32"] == record["perplexity"] == math.inf
    assert record["perplexity_change"] == 0.0 and record["quality_override"] is False


@pytest.mark.parametrize("made", ["int8", "fp16"])
def test_a_graph_already_reduced_is_refused_by_name(tmp_path, made) -> None:
    """A graph `package` took as fp32 although it was int8/fp16 already: converting it again
    re-quantized an int8 graph silently, or failed inside ONNX Runtime with a type error
    about a Transpose and the staging path."""
    graph = _export("lstm", tmp_path, precision=made) / "model.onnx"
    for target in ("int8", "fp16"):
        with pytest.raises(TrainerError, match=r"already reduced \((float16|quantized)") as err:
            precision.convert(graph, tmp_path / "again.onnx", target)
        assert "Transpose" not in str(err.value) and str(tmp_path) not in str(err.value)
    assert not (tmp_path / "again.onnx").exists()


@pytest.mark.parametrize("made", ["int8", "fp16"])
def test_packaging_a_graph_already_reduced_is_refused_by_name(tmp_path, made) -> None:
    """`rnn-trainer package` wrote `precision: "fp32"` into the manifest of an fp16 graph,
    and an int8 one failed the fp32 check with a message that did not say why."""
    from rnnserve.trainer.package import PackageRequest, package_model

    graph = _export("lstm", tmp_path / "made", precision=made) / "model.onnx"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(Manifest.load(graph.parent).vocab) + "\n")
    request = PackageRequest(
        onnx_path=graph, vocab_path=vocab, tokenizer=TokenizerConfig(), out=tmp_path / "out",
        name="byo", version="1",
    )  # fmt: skip
    with pytest.raises(TrainerError, match=r"is already reduced \((float16|quantized)"):
        package_model(request)
    assert not (tmp_path / "out" / "byo").exists()


def test_a_graph_that_does_not_load_is_one_line_without_the_staging_path(tmp_path) -> None:
    """The child's traceback ended in ORT's class path, error code and the temp file's path."""
    bad = tmp_path / ".1.tmp-x" / "model.onnx"
    bad.parent.mkdir()
    bad.write_bytes(b"not a graph")
    with pytest.raises(TrainerError) as err:
        precision._loads_in_child(bad, "int8")
    message = str(err.value)
    assert message.startswith("the int8 graph does not load: ")
    assert str(bad) not in message and "onnxruntime.capi" not in message, message


def test_perplexity_holds_about_one_copy_of_the_logits_not_several_float64_ones() -> None:
    """log-softmax over all rows at once in float64 held ~4 float32-sized copies of the logits
    [16, 1250, vocab] (a 33k-word vocabulary: over 10 GB); row by row, a few copies of one row."""
    import tracemalloc

    from rnnserve.trainer.graph_check import log_probs

    vocab = 500
    rows = precision.text_rows(np.random.default_rng(0).integers(0, vocab, 4000))
    logits = np.random.default_rng(1).standard_normal((*rows.shape, vocab)).astype(np.float32)

    class Fixed:
        specs = ()

        def run(self, x, state):
            return logits, []

    picked = np.take_along_axis(log_probs(logits)[:, :-1], rows[:, 1:, None], axis=-1)
    want = math.exp(-float(np.mean(picked)))  # the whole batch at once, as before
    assert precision.perplexity(Fixed(), rows, "lm") == pytest.approx(want, rel=1e-9)  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        precision.perplexity(Fixed(), rows, "infill")  # type: ignore[arg-type]
        precision.perplexity(Fixed(), rows, "lm")  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < logits.nbytes, (peak, logits.nbytes)


def test_the_probe_may_be_a_numpy_array(tmp_path) -> None:
    """`if probe` on an array raised "the truth value of an array ... is ambiguous"."""
    source = _export("gru", tmp_path)
    path = precision.convert_package(
        source, tmp_path / "out", "gru", "2", precision="int8", probe=np.asarray(TEXT),
        probe_source="array text",
    )  # fmt: skip
    assert Manifest.load(path).parity["precision"]["probe"].startswith("array text")


def test_a_full_disk_while_packaging_or_converting_is_one_line(tmp_path, monkeypatch) -> None:
    """`rnn-trainer package` and `--precision` conversions onto a full disk ended in an
    OSError traceback (onnx.save, copy2, manifest.save); export already said one line."""
    import errno

    from rnnserve.trainer import package as package_module
    from rnnserve.trainer.package import PackageRequest, package_model

    fp32 = _export("lstm", tmp_path / "made")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(Manifest.load(fp32).vocab) + "\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "model.onnx")

    monkeypatch.setattr(package_module.onnx, "save", full)
    request = PackageRequest(
        onnx_path=fp32 / "model.onnx", vocab_path=vocab, tokenizer=TokenizerConfig(),
        out=tmp_path / "out", name="byo", version="1",
    )  # fmt: skip
    with pytest.raises(TrainerError, match=r"cannot write the package .+: No space left"):
        package_model(request)
    monkeypatch.setattr(precision.shutil, "copy2", full)
    with pytest.raises(TrainerError, match=r"cannot write the package .+: No space left"):
        precision.convert_package(fp32, tmp_path / "out", "small", "1", precision="int8")
    assert not (tmp_path / "out").exists()


def test_the_perplexity_rows_shrink_with_a_large_vocabulary() -> None:
    """The perplexity check ran up to 20,000 tokens in one call whatever the vocabulary: at
    140k words that is 2.8 billion logits (11 GB) from ONNX Runtime at once."""
    text = np.arange(20_000) % 50
    assert precision.text_rows(text, 31).size == 20_000  # a char model: unchanged
    big = precision.text_rows(text, 140_000)
    assert big.size * 140_000 <= precision.PPL_MAX_LOGITS and big.size >= 32
