"""AsyncRnnClient: the asyncio client, same methods and results as RnnClient.

Why: servers and UIs that already run an event loop stream many generations concurrently
without threads. Shares request building, conversion and the retry policy with RnnClient.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import grpc

from rnnserve.client import convert
from rnnserve.client.connection import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    TlsConfig,
    aio_channel,
    auth_metadata,
    resolve_timeout,
)
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


class AsyncTokenStream:
    """Async iterator of TokenEvents from one Generate call; see TokenStream."""

    def __init__(self, call: Any) -> None:
        self._call = call  # grpc.aio.UnaryStreamCall
        self._parts: list[str] = []
        self.finish_reason: str | None = None
        self.state: bytes | None = None

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            async for msg in self._call:
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

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.finish_reason is None:
            self.cancel()


class AsyncRnnClient:
    """asyncio client; arguments as RnnClient. Create it inside the running event loop."""

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
        self._channel = aio_channel(address, tls)
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRnnClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel connects; raises Unavailable after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"no server at {self.address} after {timeout:g}s") from None

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
    ) -> AsyncTokenStream:
        """Stream generated tokens (`async for`). Never retried."""
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
            request, timeout=resolve_timeout(timeout, self.timeout), metadata=self._metadata
        )
        return AsyncTokenStream(call)

    async def score(
        self,
        model: str,
        texts: str | Iterable[str],
        *,
        version: str = "",
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        request = convert.score_request(model, texts, version)
        return convert.score_results(await self._unary(self._inference.Score, request, timeout))

    async def infill(
        self,
        model: str,
        left: str,
        right: str,
        *,
        top_k: int = 0,
        version: str = "",
        timeout: float | None = None,
    ) -> list[InfillCandidate]:
        request = convert.infill_request(model, left, right, top_k=top_k, version=version)
        response = await self._unary(self._inference.Infill, request, timeout)
        return convert.infill_candidates(response)

    async def forecast(
        self,
        model: str,
        history: Iterable[float],
        horizon: int,
        *,
        return_fitted: bool = False,
        version: str = "",
        timeout: float | None = None,
    ) -> ForecastResult:
        request = convert.forecast_request(
            model, history, horizon, return_fitted=return_fitted, version=version
        )
        response = await self._unary(self._inference.Forecast, request, timeout)
        return convert.forecast_result(response)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        request = pb.ListModelsRequest()
        return convert.model_list(await self._unary(self._inference.ListModels, request, timeout))

    async def get_model(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> ModelInfo:
        request = convert.get_model_request(model, version)
        return convert.model_info(await self._unary(self._inference.GetModel, request, timeout))

    async def reload_models(self, *, timeout: float | None = None) -> ReloadResult:
        request = pb.ReloadModelsRequest()
        return convert.reload_result(await self._unary(self._admin.ReloadModels, request, timeout))

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        """As RnnClient._unary: one deadline over all attempts, retry UNAVAILABLE only."""
        budget = resolve_timeout(timeout, self.timeout)
        deadline = None if budget is None else time.monotonic() + budget
        attempt = 1
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as err:
                error: RnnServeError = from_rpc_error(err)
            if not isinstance(error, Unavailable) or attempt >= self.retry.max_attempts:
                raise error
            pause = self.retry.backoff(attempt)
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise error
            await asyncio.sleep(pause)
            attempt += 1
