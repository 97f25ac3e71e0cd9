"""The one call interceptor: request id, trace span, JSON access log, metrics, and error ->
status mapping.

Every rnnserve.v1 RPC passes through `CallInterceptor`. Domain errors (server/errors.py)
become their documented status with their message; anything else is logged with its
traceback and answered INTERNAL without details. `guards` are checks run before the
handler inside the same mapping (auth, draining): raise a ServeError to refuse the call.
A request that does not even parse as its protobuf message is INVALID_ARGUMENT, not INTERNAL.
With a `tracer` (server/tracing.py) each call gets a span, current while its handler runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from rnnserve.server import logs
from rnnserve.server.errors import BadRequest, ServeError, status_for
from rnnserve.server.metrics import Metrics
from rnnserve.server.tracing import RpcSpan, RpcTracer

log = logging.getLogger("rnnserve.server.access")

Guard = Callable[[str, dict[str, str]], None]  # (full method, metadata) -> None or raise
ModelLabel = Callable[[str], str]  # request.model -> metric label (bounded cardinality)
SERVICE_PREFIX = "/rnnserve.v1."
_ids = random.Random(os.urandom(16))  # request ids: unique enough, no syscall per call


AUTHORIZATION = "authorization"
# grpc-message travels in the trailers, percent-encoded (up to 3 bytes per UTF-8 byte); past
# the client's metadata limit (8 KiB soft, 16 KiB hard) the call fails RESOURCE_EXHAUSTED
# "Stream removed" instead of its own status. 2 KiB of UTF-8 stays well inside.
MAX_MESSAGE_BYTES = 2048


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message` cut in the middle to at most about `limit` UTF-8 bytes. Error messages echo
    what the client sent (a model name, a shape, input names): a huge one would otherwise
    replace the call's status by a transport error, and fill a log line per call."""
    data = message.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return message
    head = data[: limit * 3 // 4].decode("utf-8", "ignore")
    tail = data[-(limit // 4 - 64) :].decode("utf-8", "ignore")
    cut = len(message) - len(head) - len(tail)
    return f"{head} ... ({cut} characters cut) ... {tail}"


def call_metadata(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Metadata (or HTTP headers, keys lower-cased) as the guards read it: the text values,
    the last one of a repeated key, except `authorization`, whose distinct values are joined
    by a newline (which no header or metadata value can hold). The bearer guard refuses such
    a conflict, so no path lets the order of two tokens decide whether a call is let in."""
    metadata: dict[str, str] = {}
    auth: list[str] = []
    for key, value in pairs:
        if not isinstance(value, str):
            continue
        if key == AUTHORIZATION:
            if value not in auth:
                auth.append(value)
            continue
        metadata[key] = value
    if auth:
        metadata[AUTHORIZATION] = "\n".join(auth)
    return metadata


class _Unparsable:
    """Stands in for a request whose bytes are not a valid message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Unparsable(exc)

    return parse


HEALTH_PREFIX = "/grpc.health.v1.Health/"
# grpcurl and other probes call reflection unauthenticated, like health
REFLECTION_PREFIX = "/grpc.reflection."


def _parse_or_refuse(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A health Check or Watch, or a reflection stream, whose bytes are no request message:
    INVALID_ARGUMENT, as every other method answers, not UNKNOWN with a traceback logged per
    probe."""

    async def refuse(context: grpc.aio.ServicerContext, request: _Unparsable) -> None:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            bounded(f"request: is not a valid protobuf message: {request.error}"),
        )

    def unary(behavior):
        async def wrapper(request, context):
            if isinstance(request, _Unparsable):
                await refuse(context, request)
            return await behavior(request, context)

        return wrapper

    def stream(behavior):
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write (aio Watch)
            return unary(behavior)

        async def wrapper(request, context):
            if isinstance(request, _Unparsable):
                await refuse(context, request)
            async for response in behavior(request, context):
                yield response

        return wrapper

    def streams(behavior):
        if not inspect.isasyncgenfunction(behavior):  # no such servicer here: left as it is
            return behavior

        async def checked(requests, context):
            async for request in requests:
                if isinstance(request, _Unparsable):
                    await refuse(context, request)
                yield request

        async def wrapper(requests, context):
            async for response in behavior(checked(requests, context), context):
                yield response

        return wrapper

    safe = _safe(handler.request_deserializer)
    if handler.unary_unary is not None:
        return handler._replace(request_deserializer=safe, unary_unary=unary(handler.unary_unary))
    if handler.unary_stream is not None:
        return handler._replace(
            request_deserializer=safe, unary_stream=stream(handler.unary_stream)
        )
    if handler.stream_stream is not None:  # reflection's ServerReflectionInfo
        return handler._replace(
            request_deserializer=safe, stream_stream=streams(handler.stream_stream)
        )
    return handler


class InFlightCalls:
    """Counts the gRPC calls inside their handlers, so a drain can wait for them while the
    port stays open: a call that comes meanwhile is refused by the draining guard with
    UNAVAILABLE (retried elsewhere by clients and retry policies). Once grpc's own stop has
    begun, a new call is CANCELLED instead, which a retry policy does not retry."""

    def __init__(self) -> None:
        self.count = 0
        # set as grpc's stop begins (--grace has run out, or nothing is left in flight): a
        # handler cancelled from then on was cut by the server, and its client sees
        # UNAVAILABLE "Cancelling all calls", so that is what its metrics and log say
        self.cut = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when no call is in flight, False if `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on, not on 3.10
            return False
        return True


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        metrics: Metrics,
        model_label: ModelLabel,
        guards: Sequence[Guard] = (),
        tracer: RpcTracer | None = None,
        calls: InFlightCalls | None = None,
    ) -> None:
        self.metrics = metrics
        self.model_label = model_label
        self.guards = list(guards)
        self.tracer = tracer
        self.calls = calls or InFlightCalls()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is not None and method.startswith((HEALTH_PREFIX, REFLECTION_PREFIX)):
            return _parse_or_refuse(handler)
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        rpc = method.rsplit("/", 1)[-1]
        metadata = call_metadata(details.invocation_metadata or ())
        safe = _safe(handler.request_deserializer)
        if handler.unary_unary is not None:
            return handler._replace(
                request_deserializer=safe,
                unary_unary=self._unary(handler.unary_unary, rpc, method, metadata),
            )
        if handler.unary_stream is not None:
            return handler._replace(
                request_deserializer=safe,
                unary_stream=self._stream(handler.unary_stream, rpc, method, metadata),
            )
        return handler

    # -- per call ---------------------------------------------------------------------------
    def _identify(self, method: str, metadata: dict[str, str]) -> RpcSpan | None:
        """Request id (and trace span) for the logs of this call's task."""
        rid = metadata.get("x-request-id", "")[:64] or f"{_ids.getrandbits(64):016x}"
        logs.request_id.set(rid)
        if self.tracer is None:
            return None
        span = self.tracer.start(method, metadata, rid)
        logs.trace_id.set(span.trace_id)
        return span

    def _begin(self, method: str, metadata: dict[str, str], request: Any) -> None:
        """Guards first: a caller without a valid token (or a draining server) is answered
        that, not told how its request failed to parse."""
        for guard in self.guards:
            guard(method, metadata)
        if isinstance(request, _Unparsable):
            raise BadRequest("request", f"is not a valid protobuf message: {request.error}")

    def _label(self, request: Any) -> str:
        name = getattr(request, "model", "")
        return self.model_label(name) if isinstance(name, str) else ""

    def _end(
        self,
        rpc: str,
        model: str,
        code: grpc.StatusCode,
        start: float,
        err: str,
        span: RpcSpan | None,
    ) -> None:
        elapsed = time.perf_counter() - start
        self.metrics.request_duration.labels(rpc=rpc, model=model, code=code.name).observe(elapsed)
        if code != grpc.StatusCode.OK:
            self.metrics.errors.labels(rpc=rpc, code=code.name).inc()
        extra = {"rpc": rpc, "model": model, "code": code.name, "ms": round(elapsed * 1e3, 3)}
        if err:
            extra["error"] = err
        log.info("%s %s", rpc, code.name, extra=extra)
        if span is not None:
            span.finish(code, model, err)

    def _cancelled(self, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        """The status a cancelled handler's client sees: UNAVAILABLE once the server's own
        stop cut it (the grace ran out at shutdown: the client fails over, and the error-rate
        alert counts it), else what `_cancelled` reads from the call."""
        if self.calls.cut:
            return grpc.StatusCode.UNAVAILABLE
        return _cancelled(context)

    def _fail(self, exc: BaseException, rpc: str) -> tuple[grpc.StatusCode, str]:
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("unhandled error in %s", rpc, exc_info=exc)
        return code, bounded(message)

    def _unary(self, behavior, rpc: str, method: str, metadata: dict[str, str]):
        async def wrapper(request, context: grpc.aio.ServicerContext):
            start, model = time.perf_counter(), self._label(request)
            code, message = grpc.StatusCode.OK, ""
            span = self._identify(method, metadata)
            self.calls.enter()
            try:
                self._begin(method, metadata, request)
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = self._cancelled(context)
                raise
            except Exception as exc:
                if _is_abort(exc):
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                code, message = self._fail(exc, rpc)
            finally:
                self.calls.leave()
                self._end(rpc, model, code, start, message, span)
            await _abort(context, code, message)

        return wrapper

    def _stream(self, behavior, rpc: str, method: str, metadata: dict[str, str]):
        """Wraps an async-generator handler as a coroutine that calls context.write(): grpc.aio
        sends a message that way in about half the event-loop time of a yielded one."""

        async def wrapper(request, context: grpc.aio.ServicerContext):
            start, model = time.perf_counter(), self._label(request)
            code, message = grpc.StatusCode.OK, ""
            span = self._identify(method, metadata)
            self.calls.enter()
            try:
                self._begin(method, metadata, request)
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        await context.write(response)
                return
            except asyncio.CancelledError:
                code = self._cancelled(context)
                raise
            except Exception as exc:
                if _is_abort(exc):
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                code, message = self._fail(exc, rpc)
            finally:
                self.calls.leave()
                self._end(rpc, model, code, start, message, span)
            await _abort(context, code, message)

        return wrapper


# The server's deadline runs later than the client's by the request's transit and scheduling,
# so the client's cancel at its own deadline can reach the handler first: a cancel this close
# to the server's deadline is the deadline (seen: 8 in 150 calls on a loaded machine)
DEADLINE_SLACK_S = 0.5


def _cancelled(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why grpc cancelled a handler: DEADLINE_EXCEEDED once the call's deadline has passed,
    or is within DEADLINE_SLACK_S (what the client sees, and what the error-rate alert
    counts as a server too slow), else CANCELLED (the client went away: not the server's
    failure)."""
    try:
        remaining = context.time_remaining()
    except Exception:  # a context that cannot tell: the caller left, as far as we know
        return grpc.StatusCode.CANCELLED
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


try:  # what a batch of core operations raises when the call ended in the core first
    from grpc._cython.cygrpc import ExecuteBatchError as _BatchFailed
except ImportError:  # pragma: no cover - another grpcio layout: nothing is caught
    _BatchFailed = ()  # type: ignore[assignment,misc]


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """context.abort(), for a call the gRPC core may have ended already.

    Why: a handler that fails in the same instant as the core ends its call (the deadline
    passes: the decode loop's own deadline check and the core's timer fire together; or the
    client cancels) sends a status the core no longer takes. grpc raises ExecuteBatchError,
    and logs it at ERROR with a traceback unless it has already seen the close: about 1 in
    200 streams that run into their deadline did so in a soak. The call is over, as for a
    cancelled one, so it ends like one (grpc logs that at DEBUG); its status, metrics and
    access line were recorded before."""
    try:
        await context.abort(code, message)
    except _BatchFailed as exc:
        raise asyncio.CancelledError("the call ended in the gRPC core first") from exc


def _is_abort(exc: BaseException) -> bool:
    """context.abort() raises grpc.aio.AbortError; let it through untouched."""
    return isinstance(exc, grpc.aio.AbortError)


__all__ = ["CallInterceptor", "Guard", "ServeError"]
