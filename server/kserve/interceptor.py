"""The CallInterceptor's request id, JSON access log, metrics and error mapping, for the
KServe gRPC methods (`rpc` label `kserve.<Method>`).

Why a subclass: CallInterceptor only wraps rnnserve.v1 methods. ServerLive, ServerReady and
ModelReady are health probes, treated like grpc.health.v1: not logged or counted, open unless
--auth-health (then `health_guards` holds the bearer guard).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rnnserve.server.auth import _denied
from rnnserve.server.errors import BadRequest, ServeError
from rnnserve.server.interceptors import (
    CallInterceptor,
    Guard,
    InFlightCalls,
    ModelLabel,
    _safe,
    _Unparsable,
    bounded,
    call_metadata,
)
from rnnserve.server.kserve.service import SERVICE_NAME
from rnnserve.server.metrics import Metrics
from rnnserve.server.tracing import RpcTracer

PREFIX = f"/{SERVICE_NAME}/"
HEALTH_RPCS = ("ServerLive", "ServerReady", "ModelReady")


class KServeCallInterceptor(CallInterceptor):
    def __init__(
        self,
        metrics: Metrics,
        model_label: ModelLabel,
        guards: Sequence[Guard] = (),
        health_guards: Sequence[Guard] = (),
        tracer: RpcTracer | None = None,
        calls: InFlightCalls | None = None,
    ) -> None:
        super().__init__(metrics, model_label, guards, tracer, calls)
        self.health_guards = list(health_guards)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(PREFIX) or handler.unary_unary is None:
            return handler
        name = method.rsplit("/", 1)[-1]
        metadata = call_metadata(details.invocation_metadata or ())
        if name in HEALTH_RPCS:
            try:
                for guard in self.health_guards:
                    guard(method, metadata)
            except ServeError as exc:
                return _denied(handler, exc.message)
            return handler._replace(
                request_deserializer=_safe(handler.request_deserializer),
                unary_unary=_quiet(handler.unary_unary),
            )
        return handler._replace(
            request_deserializer=_safe(handler.request_deserializer),
            unary_unary=self._unary(handler.unary_unary, f"kserve.{name}", method, metadata),
        )

    def _label(self, request: Any) -> str:
        name = getattr(request, "model_name", None) or getattr(request, "name", "")
        return self.model_label(name) if isinstance(name, str) and name else ""


def _quiet(behavior):
    """A probe's errors (an unknown model, bytes that are no protobuf message: UNKNOWN and a
    traceback otherwise) get their status, without a log line or metric."""

    async def wrapper(request, context):
        try:
            if isinstance(request, _Unparsable):
                raise BadRequest("request", f"is not a valid protobuf message: {request.error}")
            return await behavior(request, context)
        except ServeError as exc:
            await context.abort(exc.code, bounded(exc.message))

    return wrapper
