"""The graph side of `rnn-trainer package --task forecast`: which tensors play which part,
the edges fitted to the server's Forecast contract, and the checks that need no torch model.

Why its own module: a forecaster's graph reads float values, not token ids, so the language
model's inference (trainer/graph_interface.py) would refuse it at its first step. The server's
Forecast (server/forecasting.py) calls `values` float32 [batch, time, 1] -> `prediction`
float32 [batch, time, 1] with the state fed back: once over the whole history, then one
predicted value per call. A graph that takes state is used as it is (a time-major one gets a
Transpose on each side); a stateless window model, float32 [batch, tau] -> [batch, 1] (the
textbook's MLP as users export it), is wrapped so that its window becomes the state, exactly
as trainer/forecast/models.py's WindowMLP carries it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rnnserve.artifact.manifest import StateSpec
from rnnserve.trainer import probe as probes
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.exportable import state_from_spec
from rnnserve.trainer.graph_adapt import PREFIX, rename_uses, swap_first_axes
from rnnserve.trainer.graph_check import (
    VALUE_TOL,
    OrtGraph,
    check_symbolic_axes,
    failure,
)
from rnnserve.trainer.graph_interface import (
    GraphInterface,
    Tensor,
    graph_inputs,
    listing,
    misfit,
    state_pairs,
    state_spec,
    tensors,
)
from rnnserve.trainer.package_check import check_state_shapes, graph_only_parity

CONTRACT = "values float32 [batch, time, 1] -> prediction float32 [batch, time, 1] plus state"
MIN_WINDOW_OPSET = 10  # Slice with its bounds as inputs
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class WindowGraph:
    """A stateless window model: `input` float32 [batch, tau] -> `output` [batch, 1]."""

    input: str
    output: str
    tau: int


@dataclass
class ForecastInterface:
    """`iface`: the graph as the server will call it (after `adapt`); `window`: the stateless
    window model it wraps, when it is one."""

    iface: GraphInterface
    window: WindowGraph | None = None

    @property
    def notes(self) -> list[str]:
        """What was inferred, for the record and the report."""
        return self.iface.notes

    @property
    def layout(self) -> str:
        if self.window is not None:
            return "window"
        return "time-major" if self.iface.time_major else "batch-major"


def _free(dims: tuple, count: int) -> bool:
    """The first `count` axes are not fixed (symbolic or unknown): batch and time."""
    return not any(isinstance(d, int) for d in dims[:count])


def _series_axis_fits(t: Tensor) -> bool:
    """The last axis may hold one value: 1, or a size the graph leaves open."""
    return t.dims[-1] == 1 or not isinstance(t.dims[-1], int)


def _could_be_series(t: Tensor) -> bool:
    """float32 [batch, time, features]: batch and time open, or one of them open and one
    feature (a fixed time axis is then refused by name; a state [layers, batch, hidden]
    has a fixed first axis and, but for hidden 1, a fixed last one)."""
    if t.dtype != "float32" or len(t.dims) != 3:
        return False
    one_open = any(not isinstance(d, int) for d in t.dims[:2])
    return _free(t.dims, 2) or (one_open and _series_axis_fits(t))


def _likely(found: list[Tensor]) -> list[Tensor]:
    """Of several, those with both batch and time open (not a state of hidden size 1)."""
    if len(found) < 2:
        return found
    return [t for t in found if _free(t.dims, 2)] or found


def _named(found: dict[str, Tensor], name: str | None, role: str) -> Tensor | None:
    """The tensor a flag named (refused when there is none), or None when none was named."""
    if name is not None:
        if name not in found:
            raise misfit(f"there is no {role} {name!r}; the {role}s are {listing(found)}")
        return found[name]
    return None


def _values_input(inputs: dict[str, Tensor], name: str | None) -> Tensor | None:
    """The series input, float32 [batch, time, 1]; None: no such input (maybe a window graph)."""
    chosen = _named(inputs, name, "input")
    if chosen is not None and len(inputs) == 1 and len(chosen.dims) == 2:
        return None  # --input naming a window model's input
    if chosen is None:
        found = _likely([t for t in inputs.values() if _could_be_series(t)])
        if len(found) > 1:
            raise misfit(f"cannot tell the values input: {listing({t.name: t for t in found})}"
                         " all could be [batch, time, 1]; name it with --input")  # fmt: skip
        if not found:
            return None
        chosen = found[0]
    if chosen.dtype != "float32":
        lm = " (token ids in make a language model: leave out --task forecast)"
        raise misfit(f"values input {chosen.describe()} must be float32, the normalised series"
                     f"{lm if chosen.dtype in ('int64', 'int32') else ''}")  # fmt: skip
    if len(chosen.dims) != 3:
        raise misfit(f"values input {chosen.describe()} must have 3 axes, [batch, time, 1]"
                     " (one value a step); export the model on x.unsqueeze(-1)")  # fmt: skip
    if not _series_axis_fits(chosen):
        raise misfit(
            f"values input {chosen.describe()} reads {chosen.dims[2]} values per step; the"
            " server forecasts one series and feeds [batch, time, 1]: export a univariate model"
        )
    return chosen


def _prediction_output(outputs: dict[str, Tensor], name: str | None) -> Tensor:
    chosen = _named(outputs, name, "output")
    if chosen is None:
        found = _likely([t for t in outputs.values() if _could_be_series(t)])
        if len(found) > 1:
            shown = listing({t.name: t for t in found})
            raise misfit(f"cannot tell the prediction output: {shown} all could be [batch, time,"
                         " 1]; name it with --output")  # fmt: skip
        if not found:
            raise misfit(
                f"no output is a prediction [batch, time, 1] (the outputs are"
                f" {listing(outputs)}); return the next value for every step as"
                " [batch, time, 1], or name the output with --output"
            )
        chosen = found[0]
    if chosen.dtype != "float32" or len(chosen.dims) != 3 or not _series_axis_fits(chosen):
        raise misfit(
            f"prediction output {chosen.describe()} must be float32 [batch, time, 1]: the next"
            " value after every step (a flattened or last-step-only output cannot be fed back"
            " and gives no fitted values)"
        )
    return chosen


def _window_graph(
    inputs: dict[str, Tensor], outputs: dict[str, Tensor], output_name: str | None
) -> WindowGraph | None:
    """A lone float32 [batch, tau] input: the stateless window model (None: not one)."""
    if len(inputs) != 1:
        return None
    (inp,) = inputs.values()
    if inp.dtype != "float32" or len(inp.dims) != 2 or not isinstance(inp.dims[1], int):
        return None
    if isinstance(inp.dims[0], int):
        raise misfit(
            f"window input {inp.describe()}: axis 0 (batch) is fixed to {inp.dims[0]}; the"
            " package feeds every step's window as one batch, so export it with dynamic_axes"
            " naming axis 0"
        )
    fits = [t for t in outputs.values() if t.dtype == "float32" and len(t.dims) in (1, 2)
            and (len(t.dims) == 1 or _series_axis_fits(t))]  # fmt: skip
    chosen = _named(outputs, output_name, "output")
    if chosen is None:
        if len(fits) != 1:
            why = "none" if not fits else "several"
            raise misfit(
                f"window input {inp.describe()} needs one prediction output float32 [batch, 1]"
                f" ({why} among {listing(outputs)}); name it with --output"
            )
        chosen = fits[0]
    elif chosen not in fits:
        raise misfit(f"prediction output {chosen.describe()} of a window model must be float32"
                     " [batch, 1] (one next value per window)")  # fmt: skip
    if isinstance(chosen.dims[0], int):
        raise misfit(f"prediction output {chosen.describe()}: axis 0 (batch) is fixed to"
                     f" {chosen.dims[0]}; export with dynamic_axes naming it")  # fmt: skip
    return WindowGraph(inp.name, chosen.name, int(inp.dims[1]))


def _window_interface(model: onnx.ModelProto, window: WindowGraph) -> ForecastInterface:
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_WINDOW_OPSET:
        raise misfit(f"the window model's opset {opset} is below {MIN_WINDOW_OPSET}, which the"
                     " state wrapper needs; export with opset_version=17")  # fmt: skip
    taken = _taken(graph) - {window.input, window.output}
    values, prediction, state, state_out = (
        f"{PREFIX}{n}" if n in taken else n
        for n in ("values", "prediction", "window", "window_out")
    )
    spec = StateSpec("window", state, state_out, [-1, window.tau], batch_axis=0, init=0.0)
    note = (
        f"window model: {window.input} [batch, {window.tau}] -> {window.output} wrapped as"
        f" {values} [batch, time, 1] -> {prediction}, its window carried as state {state}"
    )
    return ForecastInterface(GraphInterface(values, prediction, [spec], False, [note], "float32"),
                             window)  # fmt: skip


def _taken(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names |= {*node.input, *node.output}
    return names


def resolve_forecast(
    model: onnx.ModelProto,
    *,
    input_name: str | None = None,
    output_name: str | None = None,
    states: list[str] | None = None,
    layout: str | None = None,
) -> ForecastInterface:
    """The forecaster's interface, named by the user where given and inferred where not."""
    inputs, outputs = graph_inputs(model.graph), tensors(model.graph.output)
    values = _values_input(inputs, input_name)
    if values is None:
        window = None if states else _window_graph(inputs, outputs, output_name)
        if window is not None:
            if layout == "time-major":
                raise TrainerError("--layout time-major: a window model has no time axis")
            return _window_interface(model, window)
        ids = [t for t in inputs.values() if t.dtype in ("int64", "int32") and len(t.dims) == 2]
        lm = "; token ids in make a language model: leave out --task forecast" if ids else ""
        raise misfit(
            f"no values input float32 [batch, time, 1] (the inputs are {listing(inputs)}); a"
            f" forecaster takes {CONTRACT}, or is a window model float32 [batch, tau] ->"
            f" [batch, 1] without state{lm}"
        )
    prediction = _prediction_output(outputs, output_name)
    rest_in = {k: v for k, v in inputs.items() if k != values.name}
    rest_out = {k: v for k, v in outputs.items() if k != prediction.name}
    notes: list[str] = []
    pairs, guessed = state_pairs(states, rest_in, rest_out, "values", notes)
    specs = [state_spec(i, o, axis) for i, o, axis in pairs]
    if not specs:
        raise misfit(
            f"the graph has no state inputs ({values.describe()} is its only input); Forecast"
            " warms up on the history in one call, then feeds one predicted value per call, so"
            " the graph must take its state in and give the next state out (a window model:"
            " export it on [batch, tau] windows and the package carries the window as state)"
        )
    time_major = _time_major(values, specs, inputs, layout, notes)
    iface = GraphInterface(values.name, prediction.name, specs, time_major, notes, "float32",
                           guessed_pairs=guessed)  # fmt: skip
    return ForecastInterface(iface)


def _time_major(
    values: Tensor, specs: list[StateSpec], inputs: dict[str, Tensor], layout: str | None,
    notes: list[str],
) -> bool:  # fmt: skip
    if layout is not None:
        if layout not in ("batch-major", "time-major"):
            raise TrainerError(f"--layout must be batch-major or time-major, got {layout!r}")
        return layout == "time-major"
    names = {inputs[s.input].dims[s.batch_axis] for s in specs} - {None}
    first, second = values.dims[:2]
    if second in names and first not in names:
        notes.append("layout inferred: time-major")
        return True
    if first in names and second not in names:
        notes.append("layout inferred: batch-major")
    return False


def adapt_forecast(model: onnx.ModelProto, found: ForecastInterface) -> onnx.ModelProto:
    """A copy of `model` that the server's Forecast calls as it is: a window model wrapped
    with its window as state, a time-major graph transposed at its edges; else `model`."""
    if found.window is not None:
        return _wrap_window(model, found.window, found.iface)
    if not found.iface.time_major:
        return model
    out = copy.deepcopy(model)
    graph = out.graph
    name, inner = found.iface.input, f"{PREFIX}in_{found.iface.input}"
    rename_uses(graph, name, inner)
    graph.node.insert(0, helper.make_node("Transpose", [name], [inner], perm=[1, 0, 2]))
    swap_first_axes(next(v for v in graph.input if v.name == name))
    name, inner = found.iface.output, f"{PREFIX}out_{found.iface.output}"
    _produce_as(graph, name, inner)
    graph.node.append(helper.make_node("Transpose", [inner], [name], perm=[1, 0, 2]))
    swap_first_axes(next(v for v in graph.output if v.name == name))
    return out


def _produce_as(graph: onnx.GraphProto, name: str, inner: str) -> None:
    """The node that made `name` makes `inner` instead (and its readers read `inner`)."""
    for node in graph.node:
        for i, produced in enumerate(node.output):
            if produced == name:
                node.output[i] = inner
    rename_uses(graph, name, inner)
    for v in [v for v in graph.value_info if v.name == name]:
        graph.value_info.remove(v)


def _wrap_window(
    model: onnx.ModelProto, window: WindowGraph, iface: GraphInterface
) -> onnx.ModelProto:
    """values [b, t, 1] and window [b, tau] -> the user's graph on all t windows at once
    ([b*t, tau], the windows seq[t+1 .. t+tau] of seq = window ++ values) -> prediction
    [b, t, 1] and the next window, the last tau of seq: WindowMLP.forward in ONNX."""
    out = copy.deepcopy(model)
    graph = out.graph
    tau, spec = window.tau, iface.states[0]
    p = PREFIX
    features, user_out = f"{p}features", f"{p}user_prediction"
    rename_uses(graph, window.input, features)
    _produce_as(graph, window.output, user_out)
    for entry in [v for v in graph.input if v.name == window.input]:
        graph.input.remove(entry)
    del graph.output[:]  # only the prediction and the next window reach the server

    def const(name: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), p + name))
        return p + name

    rows, cols, axis1 = const("rows", [0, -1]), const("column", [0, -1, 1]), const("axis1", [1])
    nodes = [
        helper.make_node("Reshape", [iface.input, rows], [f"{p}values_bt"]),
        helper.make_node("Concat", [spec.input, f"{p}values_bt"], [f"{p}seq"], axis=1),
    ]
    stacked = []
    for j in range(tau):
        end = j + 1 - tau or int(INT64_MAX)
        start, stop = const(f"start{j}", [1 + j]), const(f"end{j}", [end])
        column = f"{p}column{j}"
        nodes.append(helper.make_node("Slice", [f"{p}seq", start, stop, axis1], [column]))
        nodes.append(helper.make_node("Reshape", [column, cols], [f"{column}_3d"]))
        stacked.append(f"{column}_3d")
    flat = const("flat", [-1, tau])
    nodes += [
        helper.make_node("Concat", stacked, [f"{p}windows"], axis=2),  # [b, t, tau]
        helper.make_node("Reshape", [f"{p}windows", flat], [features]),  # [b*t, tau]
    ]
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    last = const("last", [-tau]), const("stop", [int(INT64_MAX)])
    graph.node.extend([
        helper.make_node("Shape", [iface.input], [f"{p}values_shape"]),
        helper.make_node("Reshape", [user_out, f"{p}values_shape"], [iface.output]),
        helper.make_node("Slice", [f"{p}seq", *last, axis1], [spec.output]),
    ])  # fmt: skip
    f32 = onnx.TensorProto.FLOAT
    graph.input.extend([
        helper.make_tensor_value_info(iface.input, f32, ["batch", "time", 1]),
        helper.make_tensor_value_info(spec.input, f32, ["batch", tau]),
    ])  # fmt: skip
    graph.output.extend([
        helper.make_tensor_value_info(iface.output, f32, ["batch", "time", 1]),
        helper.make_tensor_value_info(spec.output, f32, ["batch", tau]),
    ])  # fmt: skip
    return out


def check_forecast_interface(
    original: onnx.GraphProto, adapted: bytes, found: ForecastInterface
) -> None:
    """Symbolic axes in the graph as given, then a run of the adapted graph at batch 2,
    time 3: the prediction and each next state come back in the shapes the server reads."""
    iface = found.iface
    if found.window is None:
        check_symbolic_axes(original, iface.input, iface.output, iface.states, iface.time_major)
    graph = OrtGraph(adapted, iface.input, iface.output, iface.states)
    x = np.zeros((2, 3, 1), np.float32)
    try:
        out, state = graph.run(x, [state_from_spec(s, 2) for s in iface.states])
    except TrainerError as exc:  # often a layout read the wrong way round
        if found.window is not None:
            raise TrainerError(f"{exc} (the window model run on [batch*time, "
                               f"{found.window.tau}] windows)") from exc  # fmt: skip
        layout = "[time, batch, 1]" if iface.time_major else "[batch, time, 1]"
        raise TrainerError(f"{exc} (the values input was read as {layout}; --layout sets"
                           " it)") from exc  # fmt: skip
    if out.shape != (2, 3, 1):
        raise misfit(f"output {iface.output!r} comes back with shape {list(out.shape)} for 2"
                     " rows of 3 values; expected [batch, time, 1]")  # fmt: skip
    check_state_shapes(iface, state, rows=2)


def carried_window(adapted: bytes, found: ForecastInterface) -> int | None:
    """tau when the graph's one state [batch, tau] comes back as the last tau values fed (the
    window a window model carries, as WindowMLP's); None for any other state (a recurrent
    summary, whatever its shape)."""
    if found.window is not None:
        return found.window.tau
    specs = found.iface.states
    if len(specs) != 1 or len(specs[0].shape) != 2 or specs[0].batch_axis != 0:
        return None
    tau = specs[0].shape[1]
    graph = OrtGraph(adapted, found.iface.input, found.iface.output, specs)
    x = np.random.default_rng(0).standard_normal((1, tau + 2, 1)).astype(np.float32)
    _, (state,) = graph.run(x, [state_from_spec(specs[0], 1)])
    return tau if np.array_equal(state[0], x[0, -tau:, 0]) else None


def check_forecast_graph(
    path: Any, iface: GraphInterface, probe: np.ndarray | None, source: str, seed: int = 0
) -> dict[str, Any]:
    """package_check.check_package_graph on predictions: one call over the probe == as many
    single steps with the state fed back (Forecast's feed-back loop), and a row alone == the
    same row in a batch; returns the record stored in manifest.parity."""
    graph = OrtGraph(path, iface.input, iface.output, iface.states)
    rows = probes.ROWS
    state0 = [state_from_spec(s, rows) for s in iface.states]
    chosen = None
    if probe is not None:
        chosen = probes.windows_of(probe, source, values=True)
    chosen = chosen or probes.random_values(seed)
    x = chosen.x
    time = x.shape[1]
    window, window_state = graph.run(x, state0)
    if window.shape != (rows, time, 1):
        raise failure("predictions shape", f"{list(window.shape)} for {rows} rows of {time}"
                                           f" values, expected {[rows, time, 1]}")  # fmt: skip
    return graph_only_parity(
        graph, iface, x, state0, (window, window_state), seed, score=_as_is, tol=VALUE_TOL,
        what="predictions", argmax=False, probe_source=chosen.source,
    )  # fmt: skip


def _as_is(values: np.ndarray) -> np.ndarray:
    """A forecaster's predictions are compared as they are (in normalised units)."""
    return values


class OrtForecaster:
    """The packaged graph as a k-step predictor in its own space (the normalised
    representation), as TorchForecaster is for a torch model: LevelForecaster wraps either,
    so the intervals come from the same code `train --task forecast` runs."""

    def __init__(self, graph: OrtGraph, specs: list[StateSpec], tau: int, name: str) -> None:
        self.graph, self.specs, self.tau, self.name = graph, specs, tau, name

    def k_step(self, values: np.ndarray, origins: np.ndarray, k_max: int) -> np.ndarray:
        series = np.asarray(values, np.float32)
        state = [state_from_spec(s, 1) for s in self.specs]
        wanted = {int(t): i for i, t in enumerate(origins)}
        first: list[np.ndarray] = [np.empty(0)] * len(origins)
        saved: list[list[np.ndarray]] = [[] for _ in origins]
        start = int(origins.min())
        if start > 0:  # before the first origin: one call over the whole prefix
            _, state = self.graph.run(series[:start].reshape(1, -1, 1), state)
        for t in range(start, int(origins.max()) + 1):  # then one true value at a time
            out, state = self.graph.run(series[t].reshape(1, 1, 1), state)
            if t in wanted:
                first[wanted[t]], saved[wanted[t]] = out, state
        pred = np.concatenate(first, axis=0)  # [n, 1, 1]
        state = [np.concatenate([s[j] for s in saved], axis=spec.batch_axis)
                 for j, spec in enumerate(self.specs)]  # fmt: skip
        columns = [pred[:, 0, 0]]
        for _ in range(k_max - 1):  # feed predictions back, all origins as one batch
            pred, state = self.graph.run(pred.astype(np.float32), state)
            columns.append(pred[:, 0, 0])
        return np.stack(columns, axis=1).astype(np.float64)  # [n, k_max]
