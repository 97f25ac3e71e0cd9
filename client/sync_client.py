"""RnnClient: the blocking Python client.

Why: most callers (scripts, notebooks, the CLI) want plain function calls that return typed
results and raise typed errors; retries, deadlines and auth are handled once, here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc

from rnnserve.client import convert
from rnnserve.client.connection import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    TlsConfig,
    auth_metadata,
    resolve_timeout,
)
from rnnserve.client.connection import sync_channel as _sync_channel
from rnnserve.client.errors import RnnServeError, Unavailable, from_rpc_error
from rnnserve.client.results import (
    ForecastResult,
    InfillCandidate,
    ModelInfo,
    ReloadResult,
    ScoreResult,
    TokenEvent,
)
from rnnserve.client.retry import RetryPolicy
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc


class TokenStream:
    """Iterator of TokenEvents from one Generate call.

    After the stream ends, `finish_reason`, `state` (resume token, if asked for) and `text`
    (everything generated) describe it. Use as a context manager, or call `cancel()`, to stop
    early; the server then frees the stream's batch slot.
    """

    def __init__(self, call: Any) -> None:
        self._call = call  # grpc response iterator, also a grpc.Call
        self._parts: list[str] = []
        self.finish_reason: str | None = None
        self.state: bytes | None = None

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            for msg in self._call:
                event = convert.token_event(msg)
                self._parts.append(event.text)
                if event.is_last:
                    self.finish_reason, self.state = event.finish_reason, event.state
                yield event
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.finish_reason is None:
            self.cancel()


class RnnClient:
    """Blocking client for rnnserve's Inference and Admin services.

    timeout: default deadline in seconds for each call (a Generate stream as a whole);
    None waits forever. Every method also takes its own `timeout` (None: this default,
    math.inf: no deadline).
    token: bearer token sent as `authorization` metadata. tls: TlsConfig, or None for
    plaintext. retry: policy for unary calls that fail with UNAVAILABLE.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls: TlsConfig | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._metadata = auth_metadata(token)
        self._channel = _sync_channel(address, tls)
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)
        self._sleep: Callable[[float], None] = time.sleep

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RnnClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects; raises Unavailable after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"no server at {self.address} after {timeout:g}s") from None

    # -- Inference ---------------------------------------------------------------------------
    def generate(
        self,
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
        timeout: float | None = None,
    ) -> TokenStream:
        """Stream generated tokens. Never retried (tokens may already have been delivered)."""
        request = convert.generate_request(
            model,
            prompt,
            version=version,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            return_state=return_state,
            state=state,
        )
        call = self._inference.Generate(
            request, timeout=self._timeout(timeout), metadata=self._metadata
        )
        return TokenStream(call)

    def score(
        self,
        model: str,
        texts: str | Iterable[str],
        *,
        version: str = "",
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Perplexity, log-likelihood and per-token log-probs, one result per text."""
        request = convert.score_request(model, texts, version)
        return convert.score_results(self._unary(self._inference.Score, request, timeout))

    def infill(
        self,
        model: str,
        left: str,
        right: str,
        *,
        top_k: int = 0,
        version: str = "",
        timeout: float | None = None,
    ) -> list[InfillCandidate]:
        """Candidates for one blank token between `left` and `right`, most probable first."""
        request = convert.infill_request(model, left, right, top_k=top_k, version=version)
        return convert.infill_candidates(self._unary(self._inference.Infill, request, timeout))

    def forecast(
        self,
        model: str,
        history: Iterable[float],
        horizon: int,
        *,
        return_fitted: bool = False,
        version: str = "",
        timeout: float | None = None,
    ) -> ForecastResult:
        """Predict `horizon` values after `history` (original units)."""
        request = convert.forecast_request(
            model, history, horizon, return_fitted=return_fitted, version=version
        )
        return convert.forecast_result(self._unary(self._inference.Forecast, request, timeout))

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = self._unary(self._inference.ListModels, pb.ListModelsRequest(), timeout)
        return convert.model_list(response)

    def get_model(
        self,
        model: str,
        version: str = "",
        *,
        timeout: float | None = None,
    ) -> ModelInfo:
        request = convert.get_model_request(model, version)
        return convert.model_info(self._unary(self._inference.GetModel, request, timeout))

    # -- Admin -------------------------------------------------------------------------------
    def reload_models(self, *, timeout: float | None = None) -> ReloadResult:
        """Ask the server to rescan its model repository."""
        response = self._unary(self._admin.ReloadModels, pb.ReloadModelsRequest(), timeout)
        return convert.reload_result(response)

    # -- plumbing ----------------------------------------------------------------------------
    def _timeout(self, timeout: float | None) -> float | None:
        return resolve_timeout(timeout, self.timeout)

    def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        """Call with the deadline spanning every attempt; retry UNAVAILABLE with backoff."""
        budget = self._timeout(timeout)
        deadline = None if budget is None else time.monotonic() + budget
        attempt = 1
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as err:
                error: RnnServeError = from_rpc_error(err)
            if not isinstance(error, Unavailable) or attempt >= self.retry.max_attempts:
                raise error
            pause = self.retry.backoff(attempt)
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise error
            self._sleep(pause)
            attempt += 1
