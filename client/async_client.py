"""AsyncRnnClient: the asyncio client, same methods and results as RnnClient.

Why: servers and UIs that already run an event loop stream many generations concurrently
without threads. Shares request building, conversion and the retry policy with RnnClient.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from rnnserve.client import convert
from rnnserve.client.connection import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    TlsConfig,
    address_list,
    aio_channel,
    auth_metadata,
    resolve_timeout,
)
from rnnserve.client.errors import (
    CLIENT_CLOSED,
    Cancelled,
    RnnServeError,
    Unavailable,
    from_rpc_error,
)
from rnnserve.client.failover import (
    DEFAULT_STATE_EVERY,
    StreamLedger,
    cancelled_during_pause,
    checked_state_every,
    pause_before_next_attempt,
    with_failover_defaults,
    with_the_states_version,
)
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

# the details grpc gives a sync call that cancel() stopped, so both clients say the same
_LOCALLY_CANCELLED = "Locally cancelled by application!"


class AsyncTokenStream:
    """Async iterable of TokenEvents from one Generate call (`async for`; not an async
    iterator itself: no anext(stream)); see TokenStream (failover included)."""

    def __init__(
        self, client: AsyncRnnClient, ledger: StreamLedger, deadline: float | None, failover: bool
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._deadline = deadline
        self._failover = failover
        self._replica = client._pick()
        self._cancelled = False
        self._stop = asyncio.Event()  # set by cancel(): ends a pause before a retry at once
        self._call = client._open(ledger.attempt(), deadline, self._replica)
        self.finish_reason: str | None = None
        self.state: bytes | None = None
        self.failovers = 0

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        failures = 0
        while True:
            try:
                async for msg in self._call:
                    event = self._ledger.take(msg)
                    if event is None:  # it repeats what the caller has: no progress yet
                        continue
                    failures = 0  # something new arrived: count failures in a row only
                    if event.is_last:
                        self.finish_reason, self.state = event.finish_reason, event.state
                        yield event
                        await self._close_quietly()
                        return
                    yield event
                return
            except grpc.RpcError as err:
                error: RnnServeError = from_rpc_error(err)
            except asyncio.CancelledError:
                # grpc.aio ends a call cancel() or close() stopped with CancelledError; raise
                # Cancelled like RnnClient, so an `except RnnServeError` sees it and the
                # reading task is not marked cancelled (a TaskGroup would drop its end silently)
                if not self._stopped_by_cancel():
                    raise
                details = _LOCALLY_CANCELLED if self._cancelled else CLIENT_CLOSED
                raise Cancelled(details) from None
            failures += 1
            await self._next_attempt(error, failures)

    def _stopped_by_cancel(self) -> bool:
        """Whether a CancelledError comes from this stream's cancel() or its client's close(),
        not from the task's own cancellation (which must go on as CancelledError)."""
        if not (self._cancelled or self._client._closed):
            return False
        return not _task_cancelling()

    async def _close_quietly(self) -> None:
        """After the last message: reads the call's status; a replica that dies now has
        nothing left to give, so its error ends nothing (and starts no failover)."""
        try:
            async for _ in self._call:
                pass
        except grpc.RpcError:
            pass
        except asyncio.CancelledError:
            if not self._stopped_by_cancel():
                raise

    async def _next_attempt(self, error: RnnServeError, failures: int) -> None:
        """Raises `error` unless the stream can go on elsewhere; then waits and reopens."""
        client = self._client
        # a closed client's calls end CANCELLED: no replica failure (as RnnClient)
        self._ledger.failed(error)
        pause = pause_before_next_attempt(
            error, failures, failover=self._failover,
            cancelled=self._cancelled or client._closed,
            retry=client.retry, addresses=client.addresses, deadline=self._deadline,
            resuming=self.failovers > 0 and self._ledger.delivered,
            refusal=self._ledger.refusal,
        )  # fmt: skip
        if pause:
            await self._pause(pause)
        if self._cancelled:  # cancel() came during the pause
            raise cancelled_during_pause()
        if client._closed:  # close() came during the pause
            raise Cancelled(CLIENT_CLOSED)
        self._replica = (self._replica + 1) % len(client.addresses)
        self.failovers += 1
        self._call = client._open(self._ledger.attempt(), self._deadline, self._replica)

    async def _pause(self, seconds: float) -> None:
        """Waits `seconds` before a retry, or until cancel() or the client's close(),
        whichever comes first: a sleep would hold a cancelled stream for up to max_backoff."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._stop, self._client._closing)]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    @property
    def text(self) -> str:
        return "".join(self._ledger.text)

    @property
    def request(self) -> pb.GenerateRequest:
        """The request as sent first (with the checkpoint interval and the seed failover
        chose): the same request without failures yields the same text."""
        return self._ledger.request

    def cancel(self) -> None:
        self._cancelled = True
        self._stop.set()
        self._call.cancel()

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.finish_reason is None:
            self.cancel()

    def __del__(self) -> None:
        """A stream dropped before its end (`break` out of `async for`) stops on the server
        too, as a sync one does: a grpc.aio call is kept alive by its own reader, so without
        this the server went on generating into a full window, holding a batch slot until
        the client closed."""
        with contextlib.suppress(Exception):  # half-built, or its event loop already closed
            if self.finish_reason is None:
                self._call.cancel()


def _read_outcome(future: asyncio.Future) -> None:
    """Marks a finished watch's error as read (asyncio logs unread ones)."""
    if not future.cancelled():
        future.exception()


def _task_cancelling() -> bool:
    """Whether the running task itself is being cancelled (Python 3.11+; False before)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return bool(cancelling and cancelling())


class AsyncRnnClient:
    """asyncio client; arguments as RnnClient. Create it inside the running event loop it is
    used in (grpc.aio binds its channels to that loop); calls from another raise RuntimeError."""

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls: TlsConfig | None = None,
        retry: RetryPolicy | None = None,
        state_every: int = DEFAULT_STATE_EVERY,
        keepalive: float | None = None,
    ) -> None:
        self.addresses = address_list(address)
        self.address = ",".join(self.addresses)
        resolve_timeout(None, timeout)  # refused here, not by every call (ValueError each)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.state_every = checked_state_every(state_every)
        self._metadata = auth_metadata(token)
        self._channels = [aio_channel(a, tls, keepalive, self.retry) for a in self.addresses]
        self._inference = [pb_grpc.InferenceStub(c) for c in self._channels]
        self._admin = [pb_grpc.AdminStub(c) for c in self._channels]
        self._turn = itertools.count()
        self._closed = False
        self._closing = asyncio.Event()  # set by close(): ends a pause before a retry at once

    def _check_loop(self) -> None:
        """grpc.aio binds a channel to the event loop it was made in; a call from another
        loop (a second asyncio.run, a client made at import time) failed with grpc's
        "Event loop is closed" or "attached to a different loop", naming no cause."""
        bound = getattr(self._channels[0], "_loop", None)  # grpc.aio.Channel's own loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside any loop: grpc's own error says so
        if bound is not None and running is not bound:
            raise RuntimeError(
                "AsyncRnnClient is bound to the event loop it was created in: create one "
                "client per event loop, inside it (e.g. in the coroutine asyncio.run runs)"
            )

    def _check_open(self) -> None:
        """A call after close() is Cancelled, as one close() ended (grpc raised its UsageError,
        and wait_ready returned as if a replica were ready)."""
        if self._closed:
            raise Cancelled(CLIENT_CLOSED)

    async def close(self) -> None:
        """Closes the channels: calls and streams still running end with Cancelled."""
        self._closed = True
        self._closing.set()
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncRnnClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float | None = 10.0) -> None:
        """Wait until a replica connects; raises Unavailable after `timeout` seconds (None:
        waits as long as it takes), Cancelled when close() comes first."""
        self._check_open()
        self._check_loop()
        waits = [asyncio.ensure_future(c.channel_ready()) for c in self._channels]
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            # a wait_ready cancelled (asyncio.wait_for) left its watches running as long as
            # the client, and close() then failed them with nobody to read the error
            for w in waits:
                w.cancel()
                w.add_done_callback(_read_outcome)
        # close() from another task ends the watches with grpc's UsageError: not a ready one
        self._check_open()
        if not any(not w.cancelled() and w.exception() is None for w in done):
            waited = "" if timeout is None else f" after {timeout:g}s"
            raise Unavailable(f"no server at {self.address}{waited}")

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
        state_every: int | None = None,
        failover: bool = True,
        timeout: float | None = None,
    ) -> AsyncTokenStream:
        """Stream generated tokens (`async for`); failover as RnnClient.generate."""
        self._check_open()
        self._check_loop()
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
            state_every=state_every or 0,
        )
        with_the_states_version(request)
        if failover:
            with_failover_defaults(request, state_every or self.state_every)
        budget = resolve_timeout(timeout, self.timeout)
        deadline = None if budget is None else time.monotonic() + budget
        return AsyncTokenStream(self, StreamLedger(request), deadline, failover)

    async def score(
        self,
        model: str,
        texts: str | Iterable[str],
        *,
        version: str = "",
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        request = convert.score_request(model, texts, version)
        return convert.score_results(await self._unary("Score", request, timeout))

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
        response = await self._unary("Infill", request, timeout)
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
        response = await self._unary("Forecast", request, timeout)
        return convert.forecast_result(response)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        request = pb.ListModelsRequest()
        return convert.model_list(await self._unary("ListModels", request, timeout))

    async def get_model(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> ModelInfo:
        request = convert.get_model_request(model, version)
        return convert.model_info(await self._unary("GetModel", request, timeout))

    async def reload_models(self, *, timeout: float | None = None) -> ReloadResult:
        request = pb.ReloadModelsRequest()
        return convert.reload_result(await self._unary("ReloadModels", request, timeout))

    def _pick(self) -> int:
        """The replica for a new call: round robin over the addresses."""
        return next(self._turn) % len(self.addresses)

    def _open(self, request: pb.GenerateRequest, deadline: float | None, replica: int) -> Any:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        stub = self._inference[replica]
        return stub.Generate(request, timeout=remaining, metadata=self._metadata)

    async def _unary(self, name: str, request: Any, timeout: float | None) -> Any:
        """As RnnClient._unary: one deadline over all attempts, retry UNAVAILABLE (and a
        replica's CANCELLED) only, each retry on the next replica."""
        self._check_open()
        self._check_loop()
        budget = resolve_timeout(timeout, self.timeout)
        deadline = None if budget is None else time.monotonic() + budget
        replica = self._pick()
        attempt = 1
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            stubs = self._admin if name == "ReloadModels" else self._inference
            method = getattr(stubs[replica], name)
            try:
                return await method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as err:
                error: RnnServeError = from_rpc_error(err)
            except asyncio.CancelledError:
                # close() from another task ends the call so: Cancelled, as RnnClient says
                if not self._closed or _task_cancelling():
                    raise
                raise Cancelled(CLIENT_CLOSED) from None
            # CANCELLED here is the server's (a replica closing its port), unless close()
            # closed the channels under the call: no caller cancels a unary call otherwise
            retryable = isinstance(error, (Unavailable, Cancelled))
            if retryable and self._closed:  # close() came as the call failed: it would retry
                raise Cancelled(CLIENT_CLOSED)
            if not retryable or attempt >= self.retry.max_attempts:
                raise error
            pause = self.retry.backoff(attempt)
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise error
            # close() during the pause ends it at once: a retry on the closed channel raised
            # grpc's UsageError, no RnnServeError
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), pause)
            self._check_open()
            replica = (replica + 1) % len(self.addresses)
            attempt += 1
