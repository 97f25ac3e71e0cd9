"""Which tensors each model task takes and returns, and one ModelInfer call as Engine calls.

The inputs sent choose the use case: `text` scores (lm), `left`+`right` fill a blank
(lm and infill models), `history`+`horizon` forecast. Each is the same Engine method the
rnnserve.v1 handlers call; the table lives in docs/protocols.md.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from rnnserve.server.engine import Engine
from rnnserve.server.errors import DEADLINE_PASSED, BadRequest, DeadlineExceeded, UnsupportedTask
from rnnserve.server.forecasting import FLOAT32_MAX
from rnnserve.server.kserve.tensors import Tensor


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """One use case: the Engine method (rpc name) and its tensors."""

    rpc: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    optional: tuple[str, ...] = ()


SCORE = Signature(
    "Score",
    (TensorSpec("text", "BYTES", (-1,)),),
    (
        TensorSpec("perplexity", "FP64", (-1,)),
        TensorSpec("log_likelihood", "FP64", (-1,)),
        TensorSpec("num_tokens", "INT64", (-1,)),
    ),
)
INFILL = Signature(
    "Infill",
    (
        TensorSpec("left", "BYTES", (1,)),
        TensorSpec("right", "BYTES", (1,)),
        TensorSpec("top_k", "INT64", (1,)),
    ),
    (
        TensorSpec("text", "BYTES", (-1,)),
        TensorSpec("token_id", "INT64", (-1,)),
        TensorSpec("probability", "FP32", (-1,)),
    ),
    optional=("top_k",),
)
FORECAST = Signature(
    "Forecast",
    (TensorSpec("history", "FP32", (-1,)), TensorSpec("horizon", "INT64", (1,))),
    (
        TensorSpec("forecast", "FP32", (-1,)),
        # the 90 % interval per step, as the native Forecast's lower[] / upper[]: returned
        # only when the model has intervals (manifest.series.intervals)
        TensorSpec("lower", "FP32", (-1,)),
        TensorSpec("upper", "FP32", (-1,)),
    ),
)
SIGNATURES = (SCORE, INFILL, FORECAST)
INFILL_INPUTS = tuple(s.name for s in INFILL.inputs)

# task -> signatures, the first one is what ModelMetadata shows
BY_TASK = {"lm": (SCORE, INFILL), "infill": (INFILL,), "forecast": (FORECAST,)}

FLOATS = ("FP16", "FP32", "FP64")
INTEGERS = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


def signatures_for(task: str) -> tuple[Signature, ...]:
    return BY_TASK.get(task, ())


def _inputs_of(task: str) -> str:
    """The inputs a task's model takes ("text; or left, right, optional top_k"), for an
    error: the Engine's reason names an RPC ("use Forecast"), where a KServe client chooses
    the use case by the tensors it sends."""
    return "; or ".join(
        ", ".join(f"optional {i.name}" if i.name in s.optional else i.name for i in s.inputs)
        for s in signatures_for(task)
    )


def choose(inputs: dict[str, Tensor]) -> Signature:
    """The use case named by the inputs sent; BadRequest lists what is accepted."""
    for sig in SIGNATURES:
        if sig.inputs[0].name in inputs:
            names = {s.name for s in sig.inputs}
            missing = names - set(sig.optional) - set(inputs)
            extra = set(inputs) - names
            if missing:
                raise BadRequest("inputs", f"{sig.rpc} also needs {', '.join(sorted(missing))}")
            if extra:
                raise BadRequest("inputs", f"{sig.rpc} takes no {', '.join(sorted(extra))}")
            return sig
    accepted = "; ".join(f"{s.rpc}: {', '.join(i.name for i in s.inputs)}" for s in SIGNATURES)
    raise BadRequest("inputs", f"no known input among {sorted(inputs)}; accepted: {accepted}")


def _texts(t: Tensor) -> list[str]:
    if t.datatype != "BYTES":
        raise BadRequest(f"inputs[{t.name}]", f"must be BYTES, got {t.datatype}")
    try:
        return [b.decode("utf-8") for b in t.data]
    except UnicodeDecodeError:
        raise BadRequest(f"inputs[{t.name}]", "is not valid UTF-8") from None


def _one_text(t: Tensor) -> str:
    texts = _texts(t)
    if len(texts) != 1:
        raise BadRequest(f"inputs[{t.name}]", f"must hold one element, got {len(texts)}")
    return texts[0]


def _one_int(t: Tensor) -> int:
    if t.datatype not in INTEGERS or t.size != 1:
        raise BadRequest(f"inputs[{t.name}]", f"must be one integer, got {t.datatype}{t.shape}")
    return int(t.data[0])


async def infer(
    engine: Engine, model: str, version: str, inputs: list[Tensor], deadline: float | None = None
) -> tuple[str, list[Tensor]]:
    """Runs one ModelInfer; returns (the version that answered, every output of the task).
    `deadline` (time.perf_counter(), from Triton's `parameters.timeout`): the call is
    cancelled then and is DEADLINE_EXCEEDED, as a gRPC call past its deadline."""
    if deadline is None:
        return await _infer(engine, model, version, inputs)
    # one already past fires at the first await, so inputs refused before any work (a wrong
    # datatype, an unknown input) are still told as such rather than as the deadline
    limit = asyncio.timeout_at(asyncio.get_running_loop().time() + deadline - time.perf_counter())
    try:
        async with limit:
            return await _infer(engine, model, version, inputs)
    except TimeoutError:
        if not limit.expired():
            raise
        raise DeadlineExceeded(DEADLINE_PASSED) from None


async def _infer(
    engine: Engine, model: str, version: str, inputs: list[Tensor]
) -> tuple[str, list[Tensor]]:
    by_name: dict[str, Tensor] = {}
    for t in inputs:
        if t.name in by_name:
            raise BadRequest("inputs", f"{t.name!r} is given twice")
        by_name[t.name] = t
    sig = choose(by_name)
    try:
        # every Engine call below asks for the version the response names: a forecast
        # batch's rows look the model up after an await, when a rescan may have changed it
        version = engine.lookup(model, version, sig.rpc).version
    except UnsupportedTask as exc:
        entry = engine.repository.get(model, version)  # NOT_SERVING: that reason, unchanged
        task = entry.manifest.task if entry.manifest else ""
        raise UnsupportedTask(f"{exc} (KServe inputs: {_inputs_of(task)})") from None
    if sig is SCORE:
        outputs = await _score(engine, model, version, by_name["text"])
    elif sig is INFILL:
        outputs = await _infill(engine, model, version, by_name)
    else:
        outputs = await _forecast(engine, model, version, by_name)
    return version, outputs


def _as_input(exc: BadRequest, native: str, name: str, row: int | None = None) -> BadRequest:
    """An Engine error about a native field (`texts[3]`, `history[1]`) told as the KServe
    input it came from (`inputs[text][3]`); `row` is the row of a [B, T] history, whose
    Engine call saw one row and so counts from that row's start."""
    if exc.field != native and not exc.field.startswith(native + "["):
        return exc
    where = f"inputs[{name}]" + (f"[{row}]" if row is not None else "")
    return BadRequest(where + exc.field[len(native) :], exc.why)


async def _score(engine: Engine, model: str, version: str, text: Tensor) -> list[Tensor]:
    try:
        results = await engine.score(model, version, _texts(text))
    except BadRequest as exc:  # texts[i]: i is the flat (row-major) index
        raise _as_input(exc, "texts", "text") from None
    shape = list(text.shape)
    return [
        Tensor("perplexity", "FP64", shape, np.array([r.perplexity for r in results], "<f8")),
        Tensor(
            "log_likelihood", "FP64", shape, np.array([r.log_likelihood for r in results], "<f8")
        ),
        Tensor("num_tokens", "INT64", shape, np.array([r.num_tokens for r in results], "<i8")),
    ]


async def _infill(engine: Engine, model: str, version: str, t: dict[str, Tensor]) -> list[Tensor]:
    top_k = _one_int(t["top_k"]) if "top_k" in t else 0
    left, right = _one_text(t["left"]), _one_text(t["right"])
    try:
        found = await engine.infill(model, version, left, right, top_k)
    except BadRequest as exc:
        field = exc.field.split("[", 1)[0]
        raise _as_input(exc, field, field) if field in INFILL_INPUTS else exc from None
    k = [len(found)]
    return [
        Tensor("text", "BYTES", k, np.array([c.text.encode() for c in found], dtype=object)),
        Tensor("token_id", "INT64", k, np.array([c.token_id for c in found], "<i8")),
        Tensor("probability", "FP32", k, np.array([c.probability for c in found], "<f4")),
    ]


async def _forecast(engine: Engine, model: str, version: str, t: dict[str, Tensor]) -> list[Tensor]:
    history, horizon = t["history"], _one_int(t["horizon"])
    if history.datatype not in FLOATS:
        raise BadRequest("inputs[history]", f"must be FP16, FP32 or FP64, got {history.datatype}")
    if len(history.shape) not in (1, 2):
        raise BadRequest("inputs[history]", f"shape must be [T] or [B, T], got {history.shape}")
    if history.size == 0:
        raise BadRequest("inputs[history]", "is empty")
    series = history.data.astype(np.float64).reshape(-1, history.shape[-1])
    batched = len(history.shape) == 2
    most = engine.settings.max_score_texts  # one forecast per row: bounded like Score's texts
    if len(series) > most:
        raise BadRequest(
            "inputs[history]", f"has {len(series)} rows, more than the {most} one call takes "
            "(--max-score-texts)",
        )  # fmt: skip

    async def one(i: int, row: np.ndarray):
        try:
            return await engine.forecast(model, version, row.tolist(), horizon, False, held=True)
        except BadRequest as exc:
            exc = _as_input(exc, "history", "history", i if batched else None)
            raise _as_input(exc, "horizon", "horizon") from None

    # one --max-calls slot for the batch, as a Score call of many texts: a slot per row made
    # a batch wider than the limit fail however idle the server; every row has ended before
    # the reply (a failed row does not leave the others running)
    with engine.calls.held():
        results = await asyncio.gather(
            *(one(i, row) for i, row in enumerate(series)), return_exceptions=True
        )
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    shape = [horizon] if len(history.shape) == 1 else [len(series), horizon]
    outputs = [("forecast", [r.forecast for r in results])]
    if all(r.lower for r in results):  # a model without intervals returns only the forecast
        outputs += [("lower", [r.lower for r in results]), ("upper", [r.upper for r in results])]
    return [_fp32(name, shape, rows, batched) for name, rows in outputs]


def _fp32(name: str, shape: list[int], rows: list[list[float]], batched: bool) -> Tensor:
    """One FP32 output [B * horizon] from rows of float64 levels. FP32 (not FP64) is what
    clients of the `forecast` output already decode; a level beyond its range (a history
    near 3.4e38 in FP64) is refused, as the native Forecast refuses an overflow, rather
    than sent as inf."""
    values = np.array(rows, dtype=np.float64)
    beyond = np.argwhere(~(np.abs(values) <= FLOAT32_MAX))
    if beyond.size:
        row = f"[{beyond[0][0]}]" if batched else ""
        raise BadRequest(
            f"inputs[history]{row}",
            f"its {name} is beyond the FP32 range of the output, about 3.4e38",
        )
    return Tensor(name, "FP32", shape, values.astype("<f4").reshape(-1))


def select(outputs: list[Tensor], wanted: list[str]) -> list[Tensor]:
    """The requested outputs, in the order asked (all when none is named)."""
    if not wanted:
        return outputs
    seen: set[str] = set()
    for w in wanted:  # as an input given twice, and as Triton refuses it
        if w in seen:
            raise BadRequest("outputs", f"{w!r} is asked twice")
        seen.add(w)
    by_name = {t.name: t for t in outputs}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise BadRequest("outputs", f"no output {unknown[0]!r}; this call has {sorted(by_name)}")
    return [by_name[w] for w in wanted]
