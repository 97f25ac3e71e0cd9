"""Checks an exported graph before it is published: symbolic axes and ORT-vs-torch parity.

Why: the legacy exporter can silently bake a fixed time length into a graph, and a Python loop
over time exports as an unrolled graph of one length; both pass a single-length test. We run
time 1, time 200 and one step at a time with the state carried, and compare with torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from rnnserve.artifact.manifest import StateSpec
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.exportable import state_from_spec

TOLERANCE = 1e-4
CHECK_BATCH = 2
LONG_TIME = 200


def check_symbolic_axes(path: Path, input_name: str, output_name: str, specs: list[StateSpec]):
    """Raises unless batch/time of input/output and each state's batch axis are symbolic."""
    graph = onnx.load(str(path), load_external_data=False).graph
    values = {v.name: v for v in [*graph.input, *graph.output]}
    wanted: list[tuple[str, int]] = [(input_name, 0), (input_name, 1), (output_name, 0)]
    wanted.append((output_name, 1))
    for spec in specs:
        wanted += [(spec.input, spec.batch_axis), (spec.output, spec.batch_axis)]
    for name, axis in wanted:
        if name not in values:
            raise TrainerError(f"exported graph has no tensor named {name!r}")
        dims = values[name].type.tensor_type.shape.dim
        if axis >= len(dims) or not dims[axis].dim_param or dims[axis].HasField("dim_value"):
            raise TrainerError(f"exported graph fixes axis {axis} of {name!r}; it must be symbolic")


def _random_input(model: Any, vocab_size: int | None, time: int, gen: torch.Generator):
    if model.input_name == "tokens":
        if not vocab_size:
            raise TrainerError("a token model needs a vocabulary (or vocab_size) to be checked")
        return torch.randint(0, vocab_size, (CHECK_BATCH, time), generator=gen)  # [batch, time]
    return torch.randn(CHECK_BATCH, time, 1, generator=gen)  # [batch, time, 1]


def _torch_run(model: Any, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x, *state)
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [t.detach().cpu().numpy() for t in out]


def _compare(what: str, got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        raise TrainerError(f"export check ({what}): ONNX shape {got.shape} != torch {want.shape}")
    if got.size == 0:
        return 0.0
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = TOLERANCE * (1.0 + np.abs(want.astype(np.float64)))
    if not np.all(diff <= bound):
        raise TrainerError(
            f"export check ({what}): ONNX Runtime differs from torch by {float(diff.max()):.3g}"
            f" (tolerance {TOLERANCE} relative)"
        )
    return float(diff.max())


def check_parity(path: Path, model: Any, vocab_size: int | None, seed: int = 0) -> dict[str, Any]:
    """Runs the graph in ONNX Runtime and torch; returns the record stored in manifest.parity."""
    specs: list[StateSpec] = list(model.state_specs())
    check_symbolic_axes(path, model.input_name, model.output_name, specs)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise TrainerError(f"export check: ONNX Runtime cannot load the graph: {exc}") from exc
    state0 = tuple(model.initial_state(CHECK_BATCH))
    if len(state0) != len(specs):
        raise TrainerError(f"initial_state has {len(state0)} tensors, state_specs {len(specs)}")
    for spec, tensor in zip(specs, state0, strict=True):
        _compare(f"initial state {spec.name}", state_from_spec(spec, CHECK_BATCH), tensor.numpy())
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0

    def ort_run(x: torch.Tensor, state: list[np.ndarray]) -> list[np.ndarray]:
        feed = {model.input_name: x.numpy()}
        feed.update({s.input: v for s, v in zip(specs, state, strict=True)})
        try:
            return session.run([model.output_name, *(s.output for s in specs)], feed)
        except Exception as exc:  # ORT's own error types; a baked-in shape fails here
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TrainerError(
                f"export check: ONNX Runtime failed at time {x.shape[1]}: {first[:300]}"
            ) from exc

    np_state0 = [t.numpy() for t in state0]
    for time in (1, LONG_TIME):
        x = _random_input(model, vocab_size, time, gen)
        want = _torch_run(model, x, state0)
        got = ort_run(x, np_state0)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            worst = max(worst, _compare(f"time {time}, output {i}", g, w))
    stepwise = "skipped: stateless graph (each call sees the whole input)"
    if specs:
        x = _random_input(model, vocab_size, LONG_TIME // 4, gen)
        want = _torch_run(model, x, state0)
        state = np_state0
        for t in range(x.shape[1]):
            out, *state = ort_run(x[:, t : t + 1], state)
            worst = max(worst, _compare(f"step {t}", out, want[0][:, t : t + 1]))
        for i, (g, w) in enumerate(zip(state, want[1:], strict=True)):
            worst = max(worst, _compare(f"final state {i} after stepping", g, w))
        stepwise = f"ok: {x.shape[1]} single steps, state carried"
    return {
        "ok": True,
        "tolerance": TOLERANCE,
        "max_abs_diff": worst,
        "time_lengths": [1, LONG_TIME],
        "stepwise": stepwise,
        "symbolic_axes": True,
        "onnxruntime": ort.__version__,
    }
