"""Proves an exported graph computes what the torch model computes, before it is published.

Why these checks: the legacy exporter can bake a fixed time length into a graph, a loop over
time can export as an unrolled graph of one length, and a wrong weight layout (say, two LSTM
gates swapped) still runs. So, on inputs of the kind the model serves (trainer/probe.py):

- symbolic batch and time axes in the file, and the manifest's initial state;
- a whole window (time 200; shorter at a large vocabulary: trainer/probe.py) in one call
  == torch, and == the same window fed one step at a time with the state fed back (the
  server's decode path);
- from torch's own state at every position: one step, and short windows (time 8) == torch.
  These compare a single step's rounding, so they keep their power when the model is chaotic
  and whole windows drift apart.

Outputs are compared as log-probabilities (what the server uses) with the calibrated
tolerance of trainer/graph_check.py: float32 rounding, measured against torch in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from rnnserve.artifact.manifest import StateSpec
from rnnserve.trainer import probe as probes
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.exportable import state_from_spec
from rnnserve.trainer.graph_check import (
    LOGPROB_TOL,
    SAFETY,
    VALUE_TOL,
    OrtGraph,
    agree,
    agree_argmax,
    check_symbolic_axes,
    failure,
    log_probs,
    state_tol,
)

SHORT_TIME = 8  # the windows started from torch's state
State = list[np.ndarray]


class _Torch:
    """Calls a torch model on numpy arrays; the float64 twin measures float32 rounding."""

    def __init__(self, model: Any, float64: bool) -> None:
        self.model, self.float64 = model, float64

    def __call__(self, x: np.ndarray, state: Sequence[np.ndarray]) -> tuple[np.ndarray, State]:
        def tensor(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.double() if self.float64 and t.is_floating_point() else t

        with torch.no_grad():
            out = self.model(tensor(x), *(tensor(s) for s in state))
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        first, *rest = (t.detach().cpu().numpy() for t in out)
        return first, rest


def _float64_twin(model: Any, x: np.ndarray, state: State) -> _Torch | None:
    """A float64 copy of the model, or None when the model does not run in float64."""
    try:
        twin = _Torch(copy.deepcopy(model).double().eval(), float64=True)
        twin(x[:, :2], state)
    except Exception:  # a model that casts inside: no calibration, the plain tolerance holds
        return None
    return twin


def _stack(states_at: list[State], specs: Sequence[StateSpec]) -> State:
    """Per-position states joined along each tensor's batch axis (position-major)."""
    return [
        np.concatenate([st[i] for st in states_at], axis=s.batch_axis) for i, s in enumerate(specs)
    ]


def _short_windows(x: np.ndarray) -> np.ndarray:
    """x cut into windows of SHORT_TIME (every SHORT_TIME-th start), stacked along the batch
    (position-major, as `_stack` joins the states at those starts)."""
    starts = range(0, x.shape[1] - SHORT_TIME + 1, SHORT_TIME)
    return np.concatenate([x[:, s : s + SHORT_TIME] for s in starts], axis=0)


class _Checker:
    """Runs the comparisons and keeps the worst difference seen."""

    def __init__(self, tokens: bool, specs: Sequence[StateSpec]) -> None:
        self.tokens, self.specs = tokens, list(specs)
        self.worst, self.drift, self.top1 = 0.0, 0.0, 1.0
        self.per_check: dict[str, float] = {}

    def outputs(
        self,
        check: str,
        got: np.ndarray,
        want: np.ndarray,
        ref: np.ndarray | None,
        ref_of: np.ndarray | None = None,
    ) -> None:
        """`ref` is the float64 run of what `ref_of` (default: `want`) computes in float32."""
        base = want if ref_of is None else ref_of
        if got.shape != want.shape:
            kind = "logits" if self.tokens else "predictions"
            raise failure(check, f"{kind} have shape {list(got.shape)}, torch {list(want.shape)}")
        if self.tokens:
            g, w = log_probs(got), log_probs(want)
            noise = None if ref is None else log_probs(ref) - log_probs(base)
            worst, bound = agree(check, g, w, noise, tol=LOGPROB_TOL, what="log-probabilities")
            self.top1 = min(self.top1, agree_argmax(check, g, w, bound))
        else:
            noise = None if ref is None else np.asarray(ref, np.float64) - base
            worst, _ = agree(check, got, want, noise, tol=VALUE_TOL, what="predictions")
        self.worst = max(self.worst, worst)
        self.per_check[check] = max(self.per_check.get(check, 0.0), worst)
        if noise is not None and noise.size:
            self.drift = max(self.drift, float(np.nanmax(np.abs(noise))))

    def states(
        self, check: str, got: State, want: State, ref: State | None, ref_of: State | None = None
    ) -> None:
        tols = state_tol(want)
        base = want if ref_of is None else ref_of
        for i, spec in enumerate(self.specs):
            noise = None
            if ref is not None and np.issubdtype(want[i].dtype, np.floating):
                noise = np.asarray(ref[i], np.float64) - base[i]
            agree(check, got[i], want[i], noise, tol=tols[i], what=f"values of state {spec.name!r}",
                  time_axis=None)  # fmt: skip


def _choose_probe(
    model: Any, given: Any, source: str, vocab_size: int | None, torch32: _Torch, seed: int
) -> probes.Probe:
    values = model.input_name != "tokens"
    time = probes.probe_time(None if values else vocab_size)  # bounded memory at a large V
    if given is not None:
        found = probes.windows_of(given, source, values=values, time=time)
        if found is not None:
            return found
    if values:
        return probes.random_values(seed)
    assert vocab_size
    if model.task == "lm":
        state0 = [t.numpy() for t in model.initial_state(probes.ROWS)]
        return probes.sampled(torch32, state0, vocab_size, seed, time)
    return probes.random_tokens(vocab_size, seed, time)


def check_parity(
    path: Path,
    model: Any,
    vocab_size: int | None,
    probe: Sequence[int] | Sequence[float] | np.ndarray | None = None,
    probe_source: str = "given text",
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the graph in ONNX Runtime and torch; returns the record stored in manifest.parity.

    `probe`: token ids (or normalised values) of the kind the model serves, e.g. the
    validation split; without one the model's own samples are used.
    """
    specs: list[StateSpec] = list(model.state_specs())
    tokens = model.input_name == "tokens"
    if tokens and not vocab_size:
        raise TrainerError("a token model needs a vocabulary (or vocab_size) to be checked")
    graph = onnx.load(str(path), load_external_data=False).graph
    check_symbolic_axes(graph, model.input_name, model.output_name, specs)
    ortg = OrtGraph(path, model.input_name, model.output_name, specs)
    rows = probes.ROWS
    state0 = [t.detach().cpu().numpy() for t in model.initial_state(rows)]
    if len(state0) != len(specs):
        raise TrainerError(f"initial_state has {len(state0)} tensors, state_specs {len(specs)}")
    for spec, tensor in zip(specs, state0, strict=True):
        what = f"values of state {spec.name!r} built from the manifest"
        agree("initial state", state_from_spec(spec, rows), tensor, None, tol=1e-6, what=what,
              time_axis=None)  # fmt: skip
    torch32 = _Torch(model, float64=False)
    chosen = _choose_probe(model, probe, probe_source, vocab_size, torch32, seed)
    x = chosen.x
    time = x.shape[1]
    torch64 = _float64_twin(model, x, state0)
    run64 = (lambda a, s: torch64(a, s)) if torch64 else (lambda a, s: (None, None))
    check = _Checker(tokens, specs)

    # a whole window in one call
    want, want_state = torch32(x, state0)
    if tokens and want.shape[-1] != vocab_size:
        raise failure("logits shape", f"torch gives {want.shape[-1]} logits per step for a"
                                      f" vocabulary of {vocab_size}")  # fmt: skip
    ref, ref_state = run64(x, state0)
    got, got_state = ortg.run(x, state0)
    name = f"window of {time} in one call vs torch"
    check.outputs(name, got, want, ref)
    check.states(name, got_state, want_state, ref_state)
    if not specs:
        one = x[:, :1]
        check.outputs("window of 1 vs torch", ortg.run(one, [])[0], torch32(one, [])[0],
                      run64(one, [])[0])  # fmt: skip
        # a chaotic bidirectional model drifts by nats over the whole window, so that bound
        # passed swapped gates; windows of 8 carry only 8 steps of rounding, either way
        xw = _short_windows(x)
        check.outputs(f"windows of {SHORT_TIME} vs torch", ortg.run(xw, [])[0],
                      torch32(xw, [])[0], run64(xw, [])[0])  # fmt: skip
        stepwise = "skipped: stateless graph (each call sees the whole input)"
        return _record(check, chosen, time, stepwise, [1, time])

    # the same window one step at a time, the state fed back (the server's decode path)
    stepped, stepped_state = ortg.step_through(x, state0)
    check.outputs(f"{time} single steps vs one call of {time}", stepped, got, ref, want)
    check.outputs(f"{time} single steps vs torch", stepped, want, ref)
    check.states(f"state after {time} single steps vs one call", stepped_state, got_state,
                 ref_state, want_state)  # fmt: skip

    # from torch's own state at each position: one step, and short windows
    states_at, step_outs = [], []
    state = state0
    for t in range(time):
        states_at.append(state)
        out, state = torch32(x[:, t : t + 1], state)
        step_outs.append(out)
    xs = np.concatenate([x[:, t : t + 1] for t in range(time)], axis=0)
    from_torch = _stack(states_at, specs)
    want1 = np.concatenate(step_outs, axis=0)
    check.outputs("one step from torch's state", ortg.run(xs, from_torch)[0], want1,
                  run64(xs, from_torch)[0])  # fmt: skip
    starts = range(0, time - SHORT_TIME + 1, SHORT_TIME)
    xw = _short_windows(x)
    sw = _stack([states_at[s] for s in starts], specs)
    want_w, want_ws = torch32(xw, sw)
    ref_w, ref_ws = run64(xw, sw)
    got_w, got_ws = ortg.run(xw, sw)
    name = f"windows of {SHORT_TIME} from torch's state"
    check.outputs(name, got_w, want_w, ref_w)
    check.states(name, got_ws, want_ws, ref_ws)
    stepwise = f"ok: {time} single steps, state carried, == one call and == torch"
    return _record(check, chosen, time, stepwise, [1, time])


def _record(
    check: _Checker, chosen: probes.Probe, time: int, stepwise: str, lengths: list[int]
) -> dict[str, Any]:
    tol = LOGPROB_TOL if check.tokens else VALUE_TOL
    return {
        "ok": True,
        "compared": "log-probabilities" if check.tokens else "predictions",
        "tolerance": tol,
        "safety_factor": SAFETY,
        "max_abs_diff": check.worst,
        "max_rounding_drift": check.drift,
        "max_abs_diff_by_check": check.per_check,
        "argmax_agreement": check.top1 if check.tokens else None,
        "probe": chosen.source,
        "time_lengths": lengths,
        "stepwise": stepwise,
        "symbolic_axes": True,
        "onnxruntime": ort.__version__,
    }
