"""ONNX-side checks of a recurrent graph, shared by `export` (trainer models) and `package`
(graphs brought from elsewhere), so both meet one bar before the server sees them.

Why a calibrated tolerance: two correct float32 computations of a recurrent model drift apart
by float rounding, and a model in its chaotic regime amplifies that drift without bound. So
each comparison is allowed `tol` (the rounding of a well-behaved model, measured; see
docs/trainer.md) plus SAFETY times `noise`, the measured drift between two correct
computations of the same values on the same input (torch float32 vs float64, or a run with a
rounding-sized nudge to the state). A wrong graph differs by far more than its own rounding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from rnnserve.artifact.manifest import StateSpec
from rnnserve.artifact.ort_errors import ort_reason
from rnnserve.trainer.errors import TrainerError

LOGPROB_TOL = 1e-3  # nats, absolute, on log-softmax(logits)
VALUE_TOL = 1e-3  # forecast predictions, normalised units
STATE_TOL = 1e-3  # state tensors, relative to the largest |value| (an LSTM's c is unbounded)
SAFETY = 10.0  # how far a correct graph may exceed the measured rounding drift


def failure(check: str, detail: str) -> TrainerError:
    """The one shape of message: which check failed, then why."""
    return TrainerError(f"export check failed ({check}): {detail}")


def check_symbolic_axes(
    graph: onnx.GraphProto,
    input_name: str,
    output_name: str,
    specs: Sequence[StateSpec],
    time_major: bool = False,
) -> None:
    """Raises unless batch/time of input/output and each state's batch axis are symbolic
    (`time_major`: the input and output are [time, batch, ...])."""
    values = {v.name: v for v in [*graph.input, *graph.output]}
    batch, time = (1, 0) if time_major else (0, 1)
    wanted: list[tuple[str, int, str]] = [
        (input_name, batch, "batch"), (input_name, time, "time"),
        (output_name, batch, "batch"), (output_name, time, "time"),
    ]  # fmt: skip
    for spec in specs:
        wanted += [(spec.input, spec.batch_axis, "batch"), (spec.output, spec.batch_axis, "batch")]
    for name, axis, role in wanted:
        if name not in values:
            known = ", ".join(sorted(values))
            raise failure("symbolic axes", f"the graph has no input or output {name!r} ({known})")
        dims = values[name].type.tensor_type.shape.dim
        if axis >= len(dims):
            raise failure("symbolic axes", f"{name!r} has {len(dims)} axes; no {role} axis {axis}")
        if dims[axis].HasField("dim_value"):
            raise failure(
                "symbolic axes",
                f"axis {axis} ({role}) of {name!r} is fixed to {dims[axis].dim_value}; it must be"
                " symbolic (export with dynamic_axes naming it)",
            )


class OrtGraph:
    """One ONNX Runtime session called the way the server calls it: (x, *state) -> (out, *state)."""

    def __init__(
        self, path: Path | bytes, input_name: str, output_name: str, specs: Sequence[StateSpec]
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 4  # failures become one-line errors, not ORT logs
        try:
            source = path if isinstance(path, bytes) else str(path)  # bytes: a serialized graph
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's own error types
            raise failure(
                "load", f"ONNX Runtime cannot load the graph: {_first_line(exc)}"
            ) from exc
        self.input_name, self.output_name, self.specs = input_name, output_name, list(specs)
        self.outputs = [output_name, *(s.output for s in self.specs)]

    def run(self, x: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, list]:
        feed = {self.input_name: x}
        feed.update({s.input: v for s, v in zip(self.specs, state, strict=True)})
        try:
            out, *rest = self.session.run(self.outputs, feed)
        except Exception as exc:  # a baked-in shape fails here
            raise failure(
                f"run at time {x.shape[1]}, batch {x.shape[0]}",
                f"ONNX Runtime failed: {_first_line(exc)}",
            ) from exc
        return out, rest

    def step_through(
        self, x: np.ndarray, state: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """x one time step per call, the state fed back: (outputs over time, final state)."""
        outs = []
        current = list(state)
        for t in range(x.shape[1]):
            out, current = self.run(x[:, t : t + 1], current)
            outs.append(out)
        return np.concatenate(outs, axis=1), current


def _first_line(exc: BaseException) -> str:
    return ort_reason(str(exc)) or type(exc).__name__


def log_probs(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis in float64 (the server normalises logits the same way)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - np.max(z, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def agree(
    check: str,
    got: np.ndarray,
    want: np.ndarray,
    noise: np.ndarray | None,
    *,
    tol: float,
    what: str,
    time_axis: int | None = 1,
) -> tuple[float, np.ndarray]:
    """Raises unless |got - want| <= tol + SAFETY * noise; returns (max |got - want|, the
    bound allowed at each step).

    With a time axis the drift allowed at step t is the largest noise up to t (drift only
    grows along a sequence); integer tensors must be equal.
    """
    if got.shape != want.shape:
        raise failure(check, f"{what} has shape {list(got.shape)}, expected {list(want.shape)}")
    if got.size == 0:
        return 0.0, np.zeros(0)
    if np.issubdtype(want.dtype, np.integer) or np.issubdtype(got.dtype, np.integer):
        if not np.array_equal(got, want):
            where = np.argwhere(got != want)[0].tolist()
            raise failure(check, f"{what} are not equal at index {where}: {got[tuple(where)]}"
                                 f" != {want[tuple(where)]}")  # fmt: skip
        return 0.0, np.zeros(1)
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(g) | ~np.isfinite(w)) or np.any(np.isnan(g) != np.isnan(w)):
        raise failure(check, f"{what} has non-finite values where the reference has none")
    diff = np.nan_to_num(np.abs(g - w), nan=0.0, posinf=np.inf)
    n = np.zeros_like(diff)
    if noise is not None:
        n = np.abs(np.asarray(noise, np.float64))
        # inf - inf: a value both runs give as the same infinity (a masked token's log-prob
        # -inf) has no rounding to measure; read as unbounded it lifted the bound of its step
        # and every later one to inf, so a graph with a -inf logit passed whatever it computed
        if n.shape == w.shape:
            n = np.where(np.isnan(n) & ~np.isfinite(w), 0.0, n)
        n = np.nan_to_num(n, nan=np.inf)
    if time_axis is None:
        per, drift = diff.reshape(1, -1).max(axis=1), n.reshape(1, -1).max(axis=1)
    else:
        per = np.moveaxis(diff, time_axis, 0).reshape(diff.shape[time_axis], -1).max(axis=1)
        drift = np.maximum.accumulate(
            np.moveaxis(n, time_axis, 0).reshape(n.shape[time_axis], -1).max(axis=1)
        )
    bound = tol + SAFETY * drift
    bad = np.flatnonzero(per > bound)
    if bad.size:
        t = int(bad[0])
        where = f" at step {t}" if time_axis is not None else ""
        raise failure(
            check,
            f"{what} are {per[t]:.3g} apart{where} (allowed {bound[t]:.3g}: tolerance {tol:g}"
            f" + {SAFETY:g} x rounding drift {drift[t]:.3g})",
        )
    return float(diff.max()), bound


def agree_argmax(check: str, got_lp: np.ndarray, want_lp: np.ndarray, bound: np.ndarray) -> float:
    """The top token [batch, time] must agree, except where the reference's top two are within
    2 * bound[time] (a near tie that rounding may break either way); returns the fraction that
    agree exactly. (Log-probabilities within the bound imply this; it names the token.)"""
    top_got = np.argmax(got_lp, axis=-1)
    top_want = np.argmax(want_lp, axis=-1)
    gap = np.max(want_lp, axis=-1) - np.take_along_axis(want_lp, top_got[..., None], -1)[..., 0]
    bad = np.argwhere(gap > 2 * bound[None, :])
    if bad.size:
        i = tuple(bad[0].tolist())
        raise failure(
            check, f"the most likely token differs at [row, step] {list(i)}: id {top_got[i]}"
            f" instead of {top_want[i]} ({gap[i]:.3g} nats less likely in the reference)",
        )  # fmt: skip
    return float(np.mean(top_got == top_want))


def state_tol(want: Sequence[np.ndarray]) -> list[float]:
    """Per state tensor: STATE_TOL relative to its largest magnitude (at least absolute)."""
    return [STATE_TOL * (1.0 + float(np.max(np.abs(w)))) if w.size else STATE_TOL for w in want]


# what quantize_dynamic (and static quantization) leave in a graph: DynamicQuantizeLSTM,
# MatMulInteger, DynamicQuantizeMatMul, DequantizeLinear, QLinearMatMul, ...
QUANTIZED_OP = re.compile(r"Quantize|Integer|^QLinear")


def reduced_precision(graph: onnx.GraphProto) -> str | None:
    """What shows that `graph` is an int8 or fp16 graph already (None: it is not): the
    precision checks need the fp32 graph as their reference."""
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
        return "float16 weights"
    quantized = sorted({n.op_type for n in graph.node if QUANTIZED_OP.search(n.op_type)})
    return f"quantized ops: {', '.join(quantized)}" if quantized else None
