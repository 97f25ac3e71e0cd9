"""RnnClient: the blocking Python client.

Why: most callers (scripts, notebooks, the CLI) want plain function calls that return typed
results and raise typed errors; retries, deadlines and auth are handled once, here.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc

from rnnserve.client import convert
from rnnserve.client.connection import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    TlsConfig,
    address_list,
    auth_metadata,
    resolve_timeout,
)
from rnnserve.client.connection import sync_channel as _sync_channel
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


class TokenStream:
    """Iterable of TokenEvents from one Generate call (`for event in stream`; not an iterator
    itself: `next(iter(stream))` takes one event).

    After the stream ends, `finish_reason`, `state` (resume token, if asked for) and `text`
    (everything generated) describe it. Use as a context manager, or call `cancel()`, to stop
    early; the server then frees the stream's batch slot.

    With failover (the default), a stream whose replica dies or whose connection resets
    continues from its last checkpoint on the next replica, after a jittered pause; the
    events go on as if nothing happened (no token repeated or missing). `failovers` counts
    the moves. After `retry.max_attempts` failed attempts in a row (with nothing new
    delivered between them) it raises Unavailable.
    """

    def __init__(
        self, client: RnnClient, ledger: StreamLedger, deadline: float | None, failover: bool
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._deadline = deadline
        self._failover = failover
        self._replica = client._pick()
        self._cancelled = False
        # set by cancel() or the client's close(): ends a pause before a retry at once
        self._stop = threading.Event()
        with client._streams_lock:
            client._streams.add(self)
        self._call = client._open(ledger.attempt(), deadline, self._replica)
        self.finish_reason: str | None = None
        self.state: bytes | None = None
        self.failovers = 0

    def __iter__(self) -> Iterator[TokenEvent]:
        failures = 0
        while True:
            try:
                for msg in self._call:
                    event = self._ledger.take(msg)
                    if event is None:  # it repeats what the caller has: no progress yet
                        continue
                    failures = 0  # something new arrived: count failures in a row only
                    if event.is_last:
                        self.finish_reason, self.state = event.finish_reason, event.state
                        yield event
                        self._close_quietly()
                        return
                    yield event
                return
            except grpc.RpcError as err:
                error: RnnServeError = from_rpc_error(err)
            failures += 1
            self._next_attempt(error, failures)

    def _close_quietly(self) -> None:
        """After the last message: reads the call's status; a replica that dies now has
        nothing left to give, so its error ends nothing (and starts no failover)."""
        with contextlib.suppress(grpc.RpcError):
            for _ in self._call:
                pass

    def _next_attempt(self, error: RnnServeError, failures: int) -> None:
        """Raises `error` unless the stream can go on elsewhere; then waits and reopens."""
        client = self._client
        # a closed client's channels end its streams CANCELLED: that is no replica failure,
        # and a reopen would fail with grpc's ValueError "Channel closed!"
        self._ledger.failed(error)
        pause = pause_before_next_attempt(
            error, failures, failover=self._failover,
            cancelled=self._cancelled or client._closed,
            retry=client.retry, addresses=client.addresses, deadline=self._deadline,
            resuming=self.failovers > 0 and self._ledger.delivered,
            refusal=self._ledger.refusal,
        )  # fmt: skip
        if pause:
            self._pause(pause)
        if self._cancelled:  # cancel() came during the pause
            raise cancelled_during_pause()
        if client._closed:  # close() came during the pause
            raise Cancelled(CLIENT_CLOSED)
        self._replica = (self._replica + 1) % len(client.addresses)
        self.failovers += 1
        self._call = client._open(self._ledger.attempt(), self._deadline, self._replica)
        if self._cancelled:  # cancel() from another thread came while it opened: stop it too
            self._call.cancel()

    def _pause(self, seconds: float) -> None:
        """Waits `seconds` before a retry, or until cancel() or the client's close() (from
        another thread), whichever comes first; a sleep would hold a cancelled stream for up
        to max_backoff. Clamped to threading.TIMEOUT_MAX, past which Event.wait raises
        OverflowError."""
        self._stop.wait(min(seconds, threading.TIMEOUT_MAX))

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

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.finish_reason is None:
            self.cancel()


class RnnClient:
    """Blocking client for rnnserve's Inference and Admin services.

    address: "host:port", or several replicas (a list, or "a:1,b:2"): unary calls that get
    UNAVAILABLE (or a replica's CANCELLED) and Generate streams that lose their replica move
    on to the next one.
    timeout: default deadline in seconds for each call (a Generate stream as a whole);
    None waits forever. Every method also takes its own `timeout` (None: this default,
    math.inf: no deadline).
    token: bearer token sent as `authorization` metadata. tls: TlsConfig, or None for
    plaintext. retry: attempts and backoff for unary calls that fail with UNAVAILABLE (or a
    replica's CANCELLED) and for streams that fail over; the channels also redial a replica
    they could not reach on its schedule. state_every: tokens between a failover stream's
    checkpoints. keepalive: seconds between HTTP/2 pings during calls (None: off); a replica
    that does not answer one within as long is dead, so its streams fail over
    (docs/reliability.md).
    """

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
        self._channels = [_sync_channel(a, tls, keepalive, self.retry) for a in self.addresses]
        self._inference = [pb_grpc.InferenceStub(c) for c in self._channels]
        self._admin = [pb_grpc.AdminStub(c) for c in self._channels]
        self._turn = itertools.count()
        self._closing = threading.Event()  # set by close(): ends a pause before a retry at once
        self._sleep: Callable[[float], object] = self._pause
        self._closed = False
        self._streams: weakref.WeakSet[TokenStream] = weakref.WeakSet()  # close() wakes them
        self._streams_lock = threading.Lock()  # a stream opened while close() walks the set

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the channels: calls and streams still running end with Cancelled."""
        self._closed = True
        self._closing.set()
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:  # a failover pause ends now, not at its backoff
            stream._stop.set()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> RnnClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float | None = 10.0) -> None:
        """Block until a replica connects; raises Unavailable after `timeout` seconds (None:
        waits as long as it takes, as the async client's does)."""
        self._check_open()
        futures = [grpc.channel_ready_future(c) for c in self._channels]
        end = math.inf if timeout is None else time.monotonic() + timeout
        try:
            while not any(f.done() for f in futures):
                self._check_open()  # close() from another thread: no replica will be ready
                if time.monotonic() >= end:
                    raise Unavailable(f"no server at {self.address} after {timeout:g}s")
                time.sleep(0.02)
        finally:
            for f in futures:
                f.cancel()

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
        state_every: int | None = None,
        failover: bool = True,
        timeout: float | None = None,
    ) -> TokenStream:
        """Stream generated tokens. With `failover` the stream asks for checkpoints every
        `state_every` tokens (default: the client's) and a sampled request without a seed gets
        one, so that a replica's death costs a pause, not the stream; without it, a failure
        ends the stream (`state_every` then only asks for checkpoints, in `event.state`)."""
        self._check_open()
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
        budget = self._timeout(timeout)
        deadline = None if budget is None else time.monotonic() + budget
        return TokenStream(self, StreamLedger(request), deadline, failover)

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
        return convert.score_results(self._unary("Score", request, timeout))

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
        return convert.infill_candidates(self._unary("Infill", request, timeout))

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
        return convert.forecast_result(self._unary("Forecast", request, timeout))

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = self._unary("ListModels", pb.ListModelsRequest(), timeout)
        return convert.model_list(response)

    def get_model(
        self,
        model: str,
        version: str = "",
        *,
        timeout: float | None = None,
    ) -> ModelInfo:
        request = convert.get_model_request(model, version)
        return convert.model_info(self._unary("GetModel", request, timeout))

    # -- Admin -------------------------------------------------------------------------------
    def reload_models(self, *, timeout: float | None = None) -> ReloadResult:
        """Ask the server to rescan its model repository."""
        response = self._unary("ReloadModels", pb.ReloadModelsRequest(), timeout)
        return convert.reload_result(response)

    # -- plumbing ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        """A call after close() is Cancelled, as one close() ended (grpc raised a ValueError,
        which no `except RnnServeError` catches)."""
        if self._closed:
            raise Cancelled(CLIENT_CLOSED)

    def _pause(self, seconds: float) -> None:
        """Waits `seconds` before a retry, or until close() (from another thread): a sleep
        held the call for up to max_backoff after close(). Clamped as TokenStream._pause."""
        self._closing.wait(min(seconds, threading.TIMEOUT_MAX))

    def _timeout(self, timeout: float | None) -> float | None:
        return resolve_timeout(timeout, self.timeout)

    def _pick(self) -> int:
        """The replica for a new call: round robin over the addresses."""
        return next(self._turn) % len(self.addresses)

    def _open(self, request: pb.GenerateRequest, deadline: float | None, replica: int) -> Any:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        stub = self._inference[replica]
        return stub.Generate(request, timeout=remaining, metadata=self._metadata)

    def _unary(self, name: str, request: Any, timeout: float | None) -> Any:
        """Call with the deadline spanning every attempt; retry UNAVAILABLE with backoff,
        each retry on the next replica."""
        self._check_open()
        budget = self._timeout(timeout)
        deadline = None if budget is None else time.monotonic() + budget
        replica = self._pick()
        attempt = 1
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            stubs = self._admin if name == "ReloadModels" else self._inference
            method = getattr(stubs[replica], name)
            try:
                return method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as err:
                error: RnnServeError = from_rpc_error(err)
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
            self._sleep(pause)
            # close() during the pause: a retry on the closed channel raised grpc's
            # ValueError "Cannot invoke RPC on closed channel!", no RnnServeError
            self._check_open()
            replica = (replica + 1) % len(self.addresses)
            attempt += 1
