"""OpenTelemetry tracing: one SERVER span per rnnserve.v1 RPC, OTLP/gRPC export.

Off unless --otlp-endpoint is set (or a test hands build_app a TracerProvider): then nothing
imports OpenTelemetry and `event` / `current_span` cost one global read, so the engine may
call them on every stream. On, the interceptor starts a span per call, continuing the W3C
`traceparent` / `tracestate` the caller sent as gRPC metadata, and makes it current for the
handler's task; code running in that task adds events with `event(...)`. Code that runs
elsewhere (the scheduler's loop) keeps `current_span()` from the handler and calls
`.add_event(...)` on it later.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import grpc

TRACER_NAME = "rnnserve.server"
# SIGTERM waits at most this long for the last spans: with the collector down, the SDK's own
# shutdown retries for up to 30 s, far past --grace (and past a k8s termination grace period).
FLUSH_TIMEOUT_S = 5.0
log = logging.getLogger(__name__)
# Server-side failures (OpenTelemetry's gRPC conventions): the caller's mistakes stay unset.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
Attributes = Mapping[str, str | bool | int | float]


class SpanLike(Protocol):
    def add_event(self, name: str, attributes: Attributes | None = None) -> Any: ...

    def is_recording(self) -> bool: ...


class _NoSpan:
    """What current_span() returns with tracing off: every call does nothing."""

    __slots__ = ()

    def add_event(self, name: str, attributes: Attributes | None = None) -> None:
        return None

    def is_recording(self) -> bool:
        return False


NO_SPAN = _NoSpan()
_current: Callable[[], SpanLike] | None = None  # set once a tracer exists


def current_span() -> SpanLike:
    """The span of the RPC this task serves; NO_SPAN when tracing is off or outside a call."""
    return NO_SPAN if _current is None else _current()


def event(name: str, attributes: Attributes | None = None) -> None:
    """Adds an event (e.g. "admitted", "prefill") to the current RPC's span, if traced."""
    if _current is not None:
        _current().add_event(name, attributes)


class TracingUnavailable(RuntimeError):
    """--otlp-endpoint was given but the OpenTelemetry packages are not installed."""


def otlp_provider(endpoint: str, version: str) -> Any:
    """A TracerProvider that batches spans to an OTLP/gRPC collector at `endpoint`
    (http:// = plaintext). OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER
    and OTEL_BSP_* are honoured as the SDK documents them."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            f"--otlp-endpoint needs OpenTelemetry: pip install 'rnnserve[otel]' ({exc})"
        ) from exc
    import os

    attributes = {"service.version": version}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "rnnserve"
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.lower().startswith("http://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class RpcSpan:
    """One call's span, current in the handler's context until `finish`."""

    def __init__(self, span: Any, token: contextvars.Token | object) -> None:
        self.span = span
        self._token = token

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def finish(self, code: grpc.StatusCode, model: str, message: str) -> None:
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        span = self.span
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if model:
            span.set_attribute("rnnserve.model", model)
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, message or code.name))
        span.end()
        context.detach(self._token)


class RpcTracer:
    """Starts the per-RPC spans from one TracerProvider (owned: `shutdown` flushes it)."""

    def __init__(self, provider: Any, version: str = "") -> None:
        global _current
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._tracer = provider.get_tracer(TRACER_NAME, version)
        self._propagator = TraceContextTextMapPropagator()
        _current = trace.get_current_span

    def start(self, method: str, metadata: Mapping[str, str], request_id: str) -> RpcSpan:
        """Span `<service>/<method>` (e.g. rnnserve.v1.Inference/Generate) for a gRPC method,
        or the route's pattern for an HTTP request (`/v1/completions`,
        `/v2/models/{name}/infer`: its service part has no dot); a child of the caller's
        traceparent (gRPC metadata or HTTP headers, lower-case keys) when it sent a valid one."""
        from opentelemetry import context, trace

        parent = self._propagator.extract(dict(metadata))
        service, _, name = method.lstrip("/").partition("/")
        if "." in service and name:
            title = f"{service}/{name}"
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        else:
            title, attributes = method, {"url.path": method}
        span = self._tracer.start_span(
            title,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={**attributes, "rnnserve.request_id": request_id},
        )
        return RpcSpan(span, context.attach(trace.set_span_in_context(span, parent)))

    def shutdown(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Exports what is still buffered, then stops the exporter; False when that took
        longer than `timeout_s` (a collector that is down): the rest is dropped, so a stopping
        server exits on time. The flush runs in a daemon thread, which exit does not wait for."""
        flush = threading.Thread(target=self.provider.shutdown, name="otel-flush", daemon=True)
        flush.start()
        flush.join(timeout_s)
        if flush.is_alive():
            log.warning("tracing: spans not exported within %gs of shutdown are dropped", timeout_s)
            return False
        return True
