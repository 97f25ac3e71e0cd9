"""The export checks for a graph that comes without a torch model (`rnn-trainer package`).

Why these: with no torch reference, the graph is checked against itself on the server's own
terms: symbolic batch and time axes; logits of shape [batch, time, |vocabulary|]; one call
over T tokens == T single steps with the state fed back (how the server decodes); and rows
that do not leak into each other (how the server batches streams). Tolerances are those of
trainer/graph_check.py; the rounding drift is measured by rerunning with the initial state
nudged by a few float32 ulps, since there is no float64 twin to ask.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from rnnserve.trainer import probe as probes
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.exportable import state_from_spec
from rnnserve.trainer.graph_check import (
    LOGPROB_TOL,
    SAFETY,
    OrtGraph,
    agree,
    agree_argmax,
    check_symbolic_axes,
    failure,
    log_probs,
    state_tol,
)
from rnnserve.trainer.graph_interface import GraphInterface, misfit

NUDGE = 1e-6  # relative size of the state nudge: a few float32 ulps (6e-8 each)


def check_interface(
    original: onnx.GraphProto, adapted: bytes, iface: GraphInterface, vocab_size: int
) -> None:
    """Symbolic axes in the graph as given, then a run of the graph in the contract's layout
    (with its own token ids) at batch 2, time 3: logits and next-state shapes."""
    check_symbolic_axes(original, iface.input, iface.output, iface.states, iface.time_major)
    if not iface.states:
        raise misfit(
            "the graph has no state inputs; the server decodes one token per call, so a"
            " left-to-right model must take its state in and give the next state out"
        )
    graph = OrtGraph(adapted, iface.input, iface.output, iface.states)
    x = np.zeros((2, 3), np.int64)
    layout = "[time, batch]" if iface.time_major else "[batch, time]"
    try:
        out, state = graph.run(x, [state_from_spec(s, 2) for s in iface.states])
    except TrainerError as exc:  # often a layout read the wrong way round
        hint = f"the token input was read as {layout}; --layout sets it"
        raise TrainerError(f"{exc} ({hint})") from exc
    if out.shape != (2, 3, vocab_size):
        order = "[time, batch, vocabulary]" if iface.time_major else "[batch, time, vocabulary]"
        raise misfit(
            f"output {iface.output!r} comes back with shape {list(out.shape)} for 2 rows of 3"
            f" tokens; expected {order} with {vocab_size} tokens (the vocabulary's size)"
        )
    if out.size and np.all(out >= 0) and np.allclose(out.sum(axis=-1), 1.0, atol=1e-3):
        raise misfit(  # log-softmax of probabilities is nearly flat: every score would be wrong
            f"output {iface.output!r} holds probabilities (each step's values are >= 0 and sum"
            " to 1); the server applies log-softmax, so export the logits or log_softmax"
            " instead of softmax"
        )
    check_state_shapes(iface, state, rows=2)


def check_state_shapes(iface: GraphInterface, state: list[np.ndarray], rows: int) -> None:
    """Each next state comes back in the shape its input takes (at `rows` rows): the server
    feeds it straight back."""
    for spec, tensor in zip(iface.states, state, strict=True):
        want = list(spec.shape)
        want[spec.batch_axis] = rows
        if list(tensor.shape) != want:
            raise misfit(
                f"state output {spec.output!r} comes back with shape {list(tensor.shape)};"
                f" its input {spec.input!r} takes {want}: the next call could not read it"
            )


def nudged(state: list[np.ndarray], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for s in state:
        if np.issubdtype(s.dtype, np.floating):
            bump = NUDGE * (np.abs(s) + 1.0) * rng.standard_normal(s.shape)
            s = (s + bump).astype(s.dtype)
        out.append(s)
    return out


def check_package_graph(
    path: Path,
    iface: GraphInterface,
    vocab_size: int,
    probe: list[int] | None,
    probe_source: str,
    seed: int = 0,
) -> dict[str, Any]:
    """Checks the adapted graph at `path` (after check_interface); returns the record stored
    in manifest.parity."""
    graph = OrtGraph(path, iface.input, iface.output, iface.states)
    rows = probes.ROWS
    state0 = [state_from_spec(s, rows) for s in iface.states]
    time = probes.probe_time(vocab_size)  # bounded memory at a large V, as in export
    chosen = (
        probes.windows_of(probe, probe_source, values=False, time=time)
        if probe is not None
        else None
    ) or probes.sampled(graph.run, state0, vocab_size, seed, time)
    x = chosen.x
    time = x.shape[1]
    window, window_state = graph.run(x, state0)
    if window.shape != (rows, time, vocab_size):
        raise failure("logits shape", f"{list(window.shape)} for {rows} rows of {time} tokens,"
                                      f" expected {[rows, time, vocab_size]}")  # fmt: skip
    return graph_only_parity(
        graph, iface, x, state0, (window, window_state), seed, score=log_probs,
        tol=LOGPROB_TOL, what="log-probabilities", argmax=True, probe_source=chosen.source,
    )  # fmt: skip


def graph_only_parity(
    graph: OrtGraph,
    iface: GraphInterface,
    x: np.ndarray,
    state0: list[np.ndarray],
    called: tuple[np.ndarray, list[np.ndarray]],
    seed: int,
    *,
    score: Callable[[np.ndarray], np.ndarray],
    tol: float,
    what: str,
    argmax: bool,
    probe_source: str,
) -> dict[str, Any]:
    """The checks a graph without a torch model gets, on `score(output)` (log-probabilities
    of a language model's logits, a forecaster's predictions as they are): one call over the
    probe (`called`: its output and final state) == as many single steps with the state fed
    back, state included, and a row alone == the same row in a batch; the rounding drift is
    the graph's own, from a rerun with the initial state nudged. Returns manifest.parity."""
    window, window_state = called
    time = x.shape[1]
    twin, twin_state = graph.run(x, nudged(state0, seed))
    want = score(window)
    noise = np.asarray(score(twin), np.float64) - want
    stepped, stepped_state = graph.step_through(x, state0)
    name = f"{time} single steps vs one call of {time}"
    worst, bound = agree(name, score(stepped), want, noise, tol=tol, what=what)
    top1 = agree_argmax(name, score(stepped), want, bound) if argmax else None
    tols = state_tol(window_state)
    for i, spec in enumerate(iface.states):
        expected = window_state[i]
        drift = None
        if np.issubdtype(expected.dtype, np.floating):
            drift = np.asarray(twin_state[i], np.float64) - expected
        agree(f"state after {name}", stepped_state[i], expected, drift, tol=tols[i],
              what=f"values of state {spec.name!r}", time_axis=None)  # fmt: skip
    first_row = [np.take(state0[i], [0], axis=s.batch_axis) for i, s in enumerate(iface.states)]
    alone, _ = graph.run(x[:1], first_row)
    rows_name = "a row alone vs the same row in a batch (the state batch axes)"
    separate, _ = agree(rows_name, score(alone), want[:1], noise[:1], tol=tol, what=what)
    return {
        "ok": True,
        "compared": what,
        "reference": "the graph itself (no torch model): steps vs one call, rows alone",
        "tolerance": tol,
        "safety_factor": SAFETY,
        "max_abs_diff": max(worst, separate),
        "max_rounding_drift": float(np.max(np.abs(noise))) if noise.size else 0.0,
        "argmax_agreement": top1,
        "probe": probe_source,
        "time_lengths": [1, time],
        "stepwise": f"ok: {time} single steps, state carried, == one call",
        "symbolic_axes": True,
        "onnxruntime": ort.__version__,
    }
