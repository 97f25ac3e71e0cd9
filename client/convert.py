"""Protobuf <-> plain data, in one place shared by the sync and async clients.

Why: handlers of both clients stay three lines long, and request validation that can be done
locally (clear message, no round trip) happens before anything is sent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from rnnserve.client.errors import InvalidArgument
from rnnserve.client.results import (
    ForecastResult,
    InfillCandidate,
    ModelInfo,
    ReloadResult,
    ScoreResult,
    StateTensor,
    VersionInfo,
)
from rnnserve.v1 import rnnserve_pb2 as pb

# what each integer field's proto type holds
_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_UINT64 = (0, 2**64 - 1)

_FINISH = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
}


def generate_request(
    model: str,
    prompt: str = "",
    *,
    version: str = "",
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    return_state: bool = False,
    state: bytes | None = None,
    state_every: int = 0,
) -> pb.GenerateRequest:
    _require_model(model)
    if not prompt and not state:
        raise InvalidArgument("prompt: required unless a resume state is given")
    if isinstance(stop, str):
        stop = [stop]
    _check_text(version=version, prompt=prompt)
    _check_text(**{f"stop[{i}]": s for i, s in enumerate(stop)})
    _fits("max_tokens", max_tokens, _INT32)
    _fits("top_k", top_k, _INT32)
    _fits("state_every", state_every, _UINT32)
    sampling = pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if seed is not None:
        _fits("seed", seed, _UINT64)
        sampling.seed = seed
    return pb.GenerateRequest(
        model=model,
        version=version,
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=list(stop),
        return_state=return_state,
        state=state or b"",
        state_every=state_every,
    )


def score_request(model: str, texts: str | Iterable[str], version: str = "") -> pb.ScoreRequest:
    _require_model(model)
    if isinstance(texts, bytes):  # list() made it [97, 98, ...]: protobuf's "bad argument type"
        raise InvalidArgument("texts: must be a str or a list of str, not bytes")
    texts = [texts] if isinstance(texts, str) else list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str | bytes)), None)
    if bad is not None:
        raise InvalidArgument(f"texts[{bad}]: must be a str, not {type(texts[bad]).__name__}")
    if not texts:
        raise InvalidArgument("texts: at least one text is required")
    _check_text(version=version, **{f"texts[{i}]": t for i, t in enumerate(texts)})
    return pb.ScoreRequest(model=model, version=version, texts=texts)


def infill_request(
    model: str, left: str, right: str, *, top_k: int = 0, version: str = ""
) -> pb.InfillRequest:
    _require_model(model)
    if not left and not right:
        raise InvalidArgument("left/right: at least one context must be non-empty")
    _check_text(version=version, left=left, right=right)
    _fits("top_k", top_k, _INT32)
    return pb.InfillRequest(model=model, version=version, left=left, right=right, top_k=top_k)


def forecast_request(
    model: str,
    history: Iterable[float],
    horizon: int,
    *,
    return_fitted: bool = False,
    version: str = "",
) -> pb.ForecastRequest:
    _require_model(model)
    _check_text(version=version)
    values = _history_values(history)
    if not values:
        raise InvalidArgument("history: at least one value is required")
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise InvalidArgument(f"history: value {bad} is {values[bad]}, not a finite number")
    if horizon < 1:
        raise InvalidArgument("horizon: must be >= 1")
    _fits("horizon", horizon, _INT32)
    return pb.ForecastRequest(
        model=model,
        version=version,
        history=values,
        horizon=horizon,
        return_fitted=return_fitted,
    )


def _history_values(history: Iterable[float]) -> list[float]:
    """Floats of `history`, refusing what is not a number by its index (float() alone raised
    a bare TypeError for a None gap, naming no value) and a string (read char by char, "123"
    was the history [1, 2, 3])."""
    if isinstance(history, str | bytes):
        raise InvalidArgument("history: must be a sequence of numbers, not a string")
    values = []
    for i, v in enumerate(history):
        try:
            values.append(float(v))
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgument(f"history: value {i} is {v!r}, not a number") from None
    return values


def get_model_request(model: str, version: str = "") -> pb.GetModelRequest:
    _require_model(model)
    _check_text(version=version)
    return pb.GetModelRequest(model=model, version=version)


def _fits(name: str, value: int | None, bounds: tuple[int, int]) -> None:
    """An integer the proto field cannot hold is refused naming the field (protobuf's own
    error, "Value out of range: N", names none). None leaves the field unset, as before."""
    low, high = bounds
    if value is not None and not low <= value <= high:
        limit = f">= {low}" if value < low else f"<= {high}"
        raise InvalidArgument(f"{name}: must be {limit}, got {value}")


def _require_model(model: str) -> None:
    if not model:
        raise InvalidArgument("model: required")
    _check_text(model=model)


def _check_text(**fields: object) -> None:
    """A str protobuf cannot encode (a lone surrogate: JSON's "\\ud800", or a command-line
    byte that is not UTF-8) is refused naming its field: protobuf's UnicodeEncodeError named
    none. Other types are left to protobuf's own TypeError."""
    for name, text in fields.items():
        if not isinstance(text, str) or text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgument(
                f"{name}: not valid Unicode (a lone surrogate at character {exc.start})"
            ) from None


def finish_reason(code: int) -> str | None:
    """The reason ("length", "stop" or "eos") a FinishReason names; None: not the last."""
    return _FINISH.get(code)


def score_results(msg: pb.ScoreResponse) -> list[ScoreResult]:
    return [
        ScoreResult(
            perplexity=r.perplexity,
            log_likelihood=r.log_likelihood,
            num_tokens=r.num_tokens,
            unknown_tokens=r.unknown_tokens,
            token_logprobs=tuple(r.token_logprobs),
            tokens=tuple(r.tokens),
        )
        for r in msg.results
    ]


def infill_candidates(msg: pb.InfillResponse) -> list[InfillCandidate]:
    return [
        InfillCandidate(text=c.text, token_id=c.token_id, probability=c.probability)
        for c in msg.candidates
    ]


def forecast_result(msg: pb.ForecastResponse) -> ForecastResult:
    return ForecastResult(
        forecast=tuple(msg.forecast),
        fitted=tuple(msg.fitted),
        fitted_offset=msg.fitted_offset,
        lower=tuple(msg.lower),
        upper=tuple(msg.upper),
    )


def model_info(msg: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=msg.name,
        default_version=msg.default_version,
        versions=tuple(_version_info(v) for v in msg.versions),
    )


def _version_info(v: pb.VersionInfo) -> VersionInfo:
    return VersionInfo(
        version=v.version,
        task=v.task,
        architecture=v.architecture,
        status=v.status,
        status_reason=v.status_reason,
        vocab_size=v.vocab_size,
        tokenizer=v.tokenizer,
        execution_provider=v.execution_provider,
        rpcs=tuple(v.rpcs),
        hyperparameters=dict(v.hyperparameters),
        metrics=dict(v.metrics),
        state=tuple(StateTensor(s.name, tuple(s.shape), s.dtype) for s in v.state),
        precision=v.precision,
    )


def model_list(msg: pb.ListModelsResponse) -> list[ModelInfo]:
    return [model_info(m) for m in msg.models]


def reload_result(msg: pb.ReloadModelsResponse) -> ReloadResult:
    return ReloadResult(
        loaded=tuple(msg.loaded), unloaded=tuple(msg.unloaded), failed=tuple(msg.failed)
    )
