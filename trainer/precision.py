"""int8 and fp16 copies of an exported fp32 graph, and the check of what they cost in quality.

Why a separate pass after the fp32 export: export_check proves the fp32 graph computes what
torch computes; the reduced-precision graph is then checked against that proven fp32 graph
on the same probe text (the validation split), with tolerances that fit its precision:

- int8: ONNX Runtime's own dynamic quantization (`quantize_dynamic`, int8 weights, per-channel
  by default; activations are quantized per call). Its registry quantizes LSTM (as
  `DynamicQuantizeLSTM`), MatMul and Gather; GRU and RNN ops have no quantized kernel and stay
  float32 (the output projection around them is still quantized). An embedding table under
  EMBEDDING_INT8_MIN_BYTES stays float32: int8 would save a few kilobytes and add a
  DequantizeLinear to every call (a char model's step at batch 1 is ~30 µs; that op is 1-2).
- fp16: onnxconverter-common's float16 conversion with `keep_io_types`, so tokens, logits and
  the state stay float32 at the graph's edges. RNN/GRU/LSTM stay float32 because ONNX
  Runtime's CPU provider has no float16 kernels for them; Transpose stays float32 because
  ONNX Runtime 1.32 segfaults optimizing a float16 Transpose of our graphs. Every converted
  graph is first loaded in a child process, so such a crash is an error here, not in a server.

The check refuses a graph whose perplexity on the probe text rises by more than PPL_BOUND
(relative) unless the caller overrides it (`--allow-quality-loss`); docs/trainer.md.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from rnnserve.artifact.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    PRECISIONS,
    Manifest,
    sha256_file,
)
from rnnserve.artifact.ort_errors import ort_reason
from rnnserve.trainer import probe as probes
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.exportable import state_from_spec
from rnnserve.trainer.graph_check import (
    OrtGraph,
    check_symbolic_axes,
    log_probs,
    reduced_precision,
)
from rnnserve.trainer.staging import package_dir, staged

EMBEDDING_INT8_MIN_BYTES = 1 << 20  # a word-level table (4,600 x 128 floats: 2.4 MB) is quantized
PPL_BOUND = 0.02  # refuse when perplexity rises by more than 2% over the fp32 graph
RECURRENT_OPS = ("RNN", "GRU", "LSTM")
RECURRENT_ARCHS = ("rnn", "gru", "lstm")
FP16_KEPT_FLOAT32 = (*RECURRENT_OPS, "Transpose")
# one step fed back == one call over the window, per precision (max |log-prob| difference):
# int8 quantizes activations per call, so a window and its single steps round differently.
STEP_TOL = {"fp32": 1e-4, "int8": 0.5, "fp16": 0.05}
PPL_ROWS = 16  # perplexity: the probe text is cut into this many rows, run in one call
PPL_MAX_TOKENS = 20_000
PPL_MAX_LOGITS = (
    2**25
)  # the perplexity call's logits (128 MB of float32): fewer tokens at a large V


def check_convertible(architecture: str, task: str, precision: str) -> None:
    """int8 and fp16 are for recurrent text models: an n-gram's -1e4 log-probabilities of
    tokens that never follow stretch int8's scale until real ones round to 0, an fp16 HMM
    does not load in ONNX Runtime, and a forecaster's graph is tiny. Raises TrainerError."""
    text_rnn = architecture in RECURRENT_ARCHS and task in ("lm", "infill")
    if precision != "fp32" and not text_rnn:
        raise TrainerError(
            f"--precision {precision} applies to rnn/gru/lstm text models, not to this "
            f"{architecture} ({task}) model"
        )


def convert(src: Path, dst: Path, precision: str, per_channel: bool = True) -> dict[str, Any]:
    """Writes `dst`, the `precision` copy of the fp32 graph `src`; returns the settings record
    stored in the manifest (`quantization`)."""
    if precision not in PRECISIONS:
        known = ", ".join(PRECISIONS)
        raise TrainerError(f"unknown precision {precision!r}; choose one of {known}")
    if precision == "fp32":
        raise TrainerError("fp32 is the exported graph itself; nothing to convert")
    # such a graph can reach here as "fp32" through `package`: converted again, an int8 one
    # is re-quantized silently and an fp16 one fails inside ONNX Runtime with a type error
    reduced = reduced_precision(onnx.load(str(src), load_external_data=False).graph)
    if reduced:
        raise TrainerError(
            f"the graph is already reduced ({reduced}); {precision} converts an fp32 graph:"
            " package the original fp32 export"
        )
    ops_before = _op_counts(src)
    try:
        record = _int8(src, dst, per_channel) if precision == "int8" else _fp16(src, dst)
    except TrainerError:
        raise
    except Exception as exc:  # both tools raise many types; report one line
        text = str(exc).strip().splitlines()
        raise TrainerError(f"{precision} conversion failed: {text[0] if text else exc}") from exc
    _loads_in_child(dst, precision)
    ops_after = _op_counts(dst)
    record["ops_before"] = ops_before
    record["ops_after"] = ops_after
    record["kept_float32"] = sorted(
        op for op in RECURRENT_OPS if op in ops_after and op in ops_before
    ) if precision == "int8" else record.get("kept_float32", [])  # fmt: skip
    return record


def _float32_outputs(half: onnx.ModelProto, names: set[str]) -> None:
    """keep_io_types misses outputs made by a kept-float32 node (an LSTM's h_out): the
    converter casts them to float16. Those casts are turned back to float32."""
    producers = {out: node for node in half.graph.node for out in node.output}
    for value in half.graph.output:
        if value.name not in names or value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            continue
        node = producers.get(value.name)
        if node is None or node.op_type != "Cast":
            raise TrainerError(f"fp16 conversion made output {value.name!r} float16")
        for attr in node.attribute:
            if attr.name == "to":
                attr.i = onnx.TensorProto.FLOAT
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


LOAD_TIMEOUT_S = 300  # a converted graph the server could open at all loads in seconds


def _loads_in_child(path: Path, precision: str) -> None:
    """Loads the graph the way the server does (default optimizations) in a child process."""
    code = (  # the error's message alone, on stdout: stderr has ORT's log lines, and a
        # traceback's last line names ORT's classes and the staging path
        "import onnxruntime as o, sys\n"
        "try: o.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "except Exception as e: print(e); sys.exit(1)"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True,
            timeout=LOAD_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:  # one error line, not a traceback
        raise TrainerError(
            f"the {precision} graph did not load within {LOAD_TIMEOUT_S} s (ONNX Runtime hung "
            "optimizing it); keep the fp32 package"
        ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        why = ort_reason(done.stdout) or last  # stderr: a child that failed before loading
        if done.returncode < 0:
            why = f"ONNX Runtime crashed loading it (signal {-done.returncode})"
        raise TrainerError(f"the {precision} graph does not load: {why}")


def _op_counts(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(collections.Counter(n.op_type for n in graph.node).items()))


def _int8(src: Path, dst: Path, per_channel: bool) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    embedding_bytes = _embedding_bytes(src)
    quantize_embedding = embedding_bytes >= EMBEDDING_INT8_MIN_BYTES
    op_types = ["LSTM", "MatMul", *(["Gather"] if quantize_embedding else [])]
    quantized = logging.getLogger()
    level = quantized.level
    quantized.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint per call
    try:
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
            reduce_range=False, op_types_to_quantize=op_types,
        )  # fmt: skip
    finally:
        quantized.setLevel(level)
    return {
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "int8",
        "activations": "uint8, scale computed per call (dynamic)",
        "per_channel": per_channel,
        "reduce_range": False,
        "quantizable_ops": sorted(set(IntegerOpsRegistry) & set(op_types)),
        "embedding": {
            "bytes_float32": embedding_bytes,
            "int8": quantize_embedding,
            "int8_from_bytes": EMBEDDING_INT8_MIN_BYTES,
        },
        "onnxruntime": ort.__version__,
    }


def _embedding_bytes(path: Path) -> int:
    """Bytes of the largest float32 table a Gather reads (the embedding; 0 if none)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    tables = {t.name: t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    sizes = [
        4 * math.prod(tables[node.input[0]].dims)
        for node in graph.node
        if node.op_type == "Gather" and node.input[0] in tables
    ]
    return max(sizes, default=0)


def _fp16(src: Path, dst: Path) -> dict[str, Any]:
    from onnxconverter_common import __version__ as converter_version
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    block = [*float16.DEFAULT_OP_BLOCK_LIST, *FP16_KEPT_FLOAT32]
    float_outputs = {
        v.name for v in model.graph.output if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    _float32_outputs(half, float_outputs)
    onnx.save(half, str(dst))
    return {
        "tool": "onnxconverter_common.float16.convert_float_to_float16",
        "keep_io_types": True,
        "kept_float32": list(FP16_KEPT_FLOAT32),
        "why_kept": "ONNX Runtime's CPU provider has no float16 RNN/GRU/LSTM kernels; a float16"
        " Transpose crashes its level-3 optimizer (NchwcTransformer) when the session loads",
        "onnxconverter_common": converter_version,
    }


def text_rows(ids: Sequence[int], vocab_size: int | None = None) -> np.ndarray:
    """The probe text (up to PPL_MAX_TOKENS, fewer where PPL_MAX_LOGITS / `vocab_size` is
    less: one call outputs tokens x V logits) cut into PPL_ROWS rows, run as one batch."""
    most = PPL_MAX_TOKENS if not vocab_size else max(32, PPL_MAX_LOGITS // vocab_size)
    seq = np.asarray(ids, dtype=np.int64).reshape(-1)[: min(PPL_MAX_TOKENS, most)]
    rows = max(1, min(PPL_ROWS, seq.size // 16))
    time = seq.size // rows
    if time < 2:
        raise TrainerError("the probe text is too short to measure perplexity (needs 32 tokens)")
    return seq[: rows * time].reshape(rows, time)


def mean_nll(graph: OrtGraph, x: np.ndarray, task: str) -> float:
    """Mean negative log-likelihood (nats) of the rows `x` under the graph, from the manifest's
    initial state: lm predicts the next token, infill (bidirectional) each token itself."""
    state = [state_from_spec(s, x.shape[0]) for s in graph.specs]
    logits = graph.run(x, state)[0]
    # row by row: log_probs works in float64, and over [16, 1250, vocab] at once its copies
    # took gigabytes for a word-level vocabulary (over 10 GB at 33k words)
    total, count = 0.0, 0
    for row, tokens in zip(logits, x, strict=True):
        lp, target = (row, tokens) if task == "infill" else (row[:-1], tokens[1:])
        picked = np.take_along_axis(log_probs(lp), target[:, None], axis=-1)
        total, count = total + float(np.sum(picked)), count + picked.size
    return -total / count


def perplexity(graph: OrtGraph, x: np.ndarray, task: str) -> float:
    """exp(mean_nll): inf, not OverflowError, past float64's range."""
    return _exp(mean_nll(graph, x, task))


def _exp(x: float) -> float:
    """math.exp, but inf where it overflows (NaN stays NaN)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def reduce_precision(
    onnx_path: Path,
    manifest: Manifest,
    probe: Sequence[int] | Sequence[float] | None,
    probe_source: str,
    *,
    precision: str,
    per_channel: bool = True,
    allow_quality_loss: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replaces the checked fp32 graph at `onnx_path` (whose interface `manifest` describes)
    by its `precision` copy, checked; returns (manifest.quantization, parity["precision"])."""
    vocab_size = manifest.vocab_size or int(manifest.hyperparameters.get("vocab_size") or 0)
    # the task, not the input's name: a packaged graph keeps its own names ("input", "x")
    if manifest.task not in ("lm", "infill") or not vocab_size:
        raise TrainerError(
            f"--precision {precision} is for token models (lm, infill); export this one at fp32"
        )
    fp32 = onnx_path.with_name(onnx_path.stem + ".fp32.onnx")
    onnx_path.rename(fp32)
    try:
        settings = convert(fp32, onnx_path, precision, per_channel)
        specs = list(manifest.state)
        ref = OrtGraph(fp32, manifest.input_name, manifest.output_name, specs)
        windows = None  # `is not None`, not truthiness: a numpy array of ids has no truth value
        time = probes.probe_time(vocab_size)  # bounded memory at a large V, as in export
        if probe is not None:
            windows = probes.windows_of(probe, probe_source, values=False, time=time)
        if windows is not None and probe is not None:
            rows = text_rows(probe, vocab_size)  # type: ignore[arg-type]
        else:
            state0 = [state_from_spec(s, probes.ROWS) for s in specs]
            windows = (
                probes.sampled(ref.run, state0, vocab_size, time=time)
                if manifest.task == "lm"
                else probes.random_tokens(vocab_size, time=time)
            )
            rows = windows.x
        got = OrtGraph(onnx_path, manifest.input_name, manifest.output_name, specs)
        record = check_precision(
            ref, got, onnx_path, precision=precision, task=manifest.task, probe=windows,
            rows=rows, allow_quality_loss=allow_quality_loss,
        )  # fmt: skip
    finally:
        fp32.unlink(missing_ok=True)
    return settings, record


def convert_package(
    src: Path,
    out: Path,
    name: str,
    version: str,
    *,
    precision: str,
    probe: Sequence[int] | None = None,
    probe_source: str = "given text",
    per_channel: bool = True,
    allow_quality_loss: bool = False,
) -> Path:
    """Writes OUT/NAME/VERSION: the fp32 package `src` at `precision`, checked, atomically
    (its checkpoint.pt, if any, comes along); returns that directory."""
    source = Manifest.load(src)
    check_convertible(source.architecture, source.task, precision)
    if source.precision != "fp32":
        raise TrainerError(f"{src} is already {source.precision}; convert from an fp32 package")
    target = package_dir(out, name, version)
    with staged(target) as tmp:
        for item in Path(src).iterdir():
            if item.is_file() and item.name != MANIFEST_FILE:
                shutil.copy2(item, tmp / item.name)
        settings, record = reduce_precision(
            tmp / ONNX_FILE, source, probe, probe_source, precision=precision,
            per_channel=per_channel, allow_quality_loss=allow_quality_loss,
        )  # fmt: skip
        manifest = dataclasses.replace(
            source, name=name, version=version, precision=precision, quantization=settings,
            parity={**source.parity, "precision": record},
            onnx_sha256=sha256_file(tmp / ONNX_FILE),
        )  # fmt: skip
        manifest.save(tmp)
        Manifest.load(tmp)
    return target


def check_precision(
    ref: OrtGraph,
    got: OrtGraph,
    path: Path,
    *,
    precision: str,
    task: str,
    probe: probes.Probe,
    rows: np.ndarray,
    allow_quality_loss: bool = False,
) -> dict[str, Any]:
    """Checks the converted graph `got` (file `path`) against the proven fp32 graph `ref`:
    symbolic axes, single steps == one call within STEP_TOL, identical reruns, and the
    perplexity of `rows`. Raises TrainerError on a broken graph, or on a perplexity rise above
    PPL_BOUND unless `allow_quality_loss`."""
    specs, probe_source, x = got.specs, probe.source, probe.x
    graph = onnx.load(str(path), load_external_data=False).graph
    check_symbolic_axes(graph, got.input_name, got.output_name, specs)
    state0 = [state_from_spec(s, x.shape[0]) for s in specs]
    window, _ = got.run(x, state0)
    want, _ = ref.run(x, state0)
    lp_got, lp_want = log_probs(window), log_probs(want)
    top1 = float(np.mean(lp_got.argmax(-1) == lp_want.argmax(-1)))
    record: dict[str, Any] = {
        "precision": precision,
        "compared_with": "the fp32 graph (itself checked against torch)",
        "probe": probe_source,
        "max_abs_logprob_diff_vs_fp32": float(np.max(np.abs(lp_got - lp_want))),
        "argmax_agreement_vs_fp32": top1,
    }
    if specs:
        stepped, _ = got.step_through(x, state0)
        diff = float(np.max(np.abs(log_probs(stepped) - lp_got)))
        record["step_vs_window_max_abs_diff"] = diff
        record["step_tolerance"] = STEP_TOL[precision]
        if not diff <= STEP_TOL[precision]:
            raise TrainerError(
                f"{precision} check failed: single steps with the state fed back differ from one"
                f" call over the window by {diff:.3g} in log-probability (bound"
                f" {STEP_TOL[precision]}); the state does not carry through this graph"
            )
        again, _ = got.step_through(x, state0)
        if not np.array_equal(again, stepped):
            raise TrainerError(f"{precision} check failed: the same steps gave different outputs")
        record["resume"] = "exact: the same steps from the same state give identical outputs"
    if task in ("lm", "infill"):
        # in log space: ppl / ppl32 overflowed (OverflowError) for a probe the model finds
        # absurdly unlikely; and NaN is refused outright, as `NaN > bound` is False
        nll32, nll = mean_nll(ref, rows, task), mean_nll(got, rows, task)
        if math.isnan(nll) and not math.isnan(nll32):
            raise TrainerError(
                f"{precision} check failed: the graph computes NaN log-probabilities on"
                f" {probe_source} where the fp32 graph does not; keep fp32"
            )
        ppl32, ppl = _exp(nll32), _exp(nll)
        change = 0.0 if nll == nll32 else _exp(nll - nll32) - 1.0
        record.update(
            perplexity_fp32=ppl32, perplexity=ppl, perplexity_change=change,
            perplexity_bound=PPL_BOUND, perplexity_tokens=int(rows.size),
        )  # fmt: skip
        if not change <= PPL_BOUND and not allow_quality_loss:
            raise TrainerError(
                f"{precision} raises perplexity on {probe_source} by {change:+.2%}"
                f" ({ppl32:.4f} -> {ppl:.4f}), above the bound of +{PPL_BOUND:.0%};"
                " keep fp32, or pass --allow-quality-loss to publish it anyway"
            )
        record["quality_override"] = not change <= PPL_BOUND
    return record
