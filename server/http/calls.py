"""Each HTTP request goes through the gRPC CallInterceptor's own steps, so request ids, bearer
tokens, draining, JSON access logs and metrics are the same code on both ports.

`_identify` (request id, trace span), `_begin` (guards), `_fail` (error -> status, INTERNAL
logged) and `_end` (log line, rnnserve_request_duration_seconds, rnnserve_errors_total) are
called as they are for an RPC; the matched route's pattern (`/v2/models/{name}/infer`, never
the raw path a client chose) is the "method" the guards see and the span's name. Probes
(health) skip them like grpc.health.v1 does: open unless --auth-health, not logged or
counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from aiohttp import web

from rnnserve.server import logs
from rnnserve.server.errors import BadRequest
from rnnserve.server.http.errors import BodyTimeout, BodyTooLarge, ClientGone, http_status
from rnnserve.server.interceptors import CallInterceptor, Guard, call_metadata

ErrorBody = Callable[[grpc.StatusCode, str, BaseException | None], dict]


@dataclass
class Call:
    """What a handler reports back: the model label, and the status of a stream that
    failed after its headers were sent."""

    request_id: str = ""
    model: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""


Handler = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]


async def read_json(request: web.Request) -> object:
    """The body as JSON; BadRequest when it is not (413 past --max-message-bytes)."""
    return loads(await read_body(request))


BODY_TIMEOUT_S = 60.0  # for a whole request body to arrive (aiohttp itself waits forever)


async def read_body(request: web.Request) -> bytes:
    """The body; BadRequest when aiohttp cannot decode it (gzip or deflate bytes that are not,
    a broken chunk): the client's mistake, which would otherwise be an INTERNAL 500.
    BodyTimeout (408) when it has not all come within BODY_TIMEOUT_S: a client that sent 1 of
    a promised 100 bytes held its connection and handler for good. ClientGone when the
    client closed its connection first."""
    try:
        return await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
        raise BodyTimeout(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s") from None
    except web.RequestPayloadError as exc:
        why = getattr(exc.__cause__, "message", "") or str(exc)
        raise BadRequest("request", f"the body could not be read: {why}") from None
    except ConnectionResetError:  # asyncio.wait_for hands it on even as the task is cancelled
        raise ClientGone("the client went away before its request body was read") from None


def loads(raw: bytes) -> object:
    """JSON from a client; BadRequest when it is not JSON or nests too deep to parse (json
    raises RecursionError past about a thousand levels: a bug's 500 otherwise)."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadRequest("request", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request", "the body nests arrays or objects too deeply") from None


def json_response(body: object, status: int = 200, request_id: str = "") -> web.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    if status == 401:  # RFC 9110: a 401 names its scheme (clients that negotiate auth need it)
        headers["WWW-Authenticate"] = 'Bearer realm="rnnserve"'
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _metadata(request: web.Request) -> dict[str, str]:
    """The headers as the interceptor's steps read gRPC metadata. An `x-request-id` that gRPC
    metadata could not carry (not printable ASCII: aiohttp hands undecodable bytes on as
    surrogates) is dropped for a fresh id: the header echoed and the id in the body and the
    access line would otherwise differ."""
    metadata = call_metadata((k.lower(), v) for k, v in request.headers.items())
    rid = metadata.get("x-request-id", "")
    if not (rid.isascii() and rid.isprintable()):
        del metadata["x-request-id"]
    return metadata


def _route(request: web.Request, rpc: str) -> str:
    """The matched route's pattern (`/v2/models/{name}/infer`), the trace span's name: the
    raw path holds whatever model name a client sends, and a span name per string would
    grow a tracing backend's index without bound (gRPC spans are named after the method)."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else rpc


class HttpCalls:
    def __init__(self, interceptor: CallInterceptor, health_guards: Sequence[Guard] = ()):
        self.interceptor = interceptor
        self.health_guards = list(health_guards)
        # set by HttpServer.stop as --grace runs out and it closes the connections left: a
        # request it cuts is the server's failure (its client sees the connection drop), so
        # it counts UNAVAILABLE, as a gRPC call cut then does, not a client's CANCELLED
        self.cut = False

    def endpoint(self, rpc: str, handler: Handler, errors: ErrorBody) -> Handler:
        """An aiohttp handler that runs `handler` as one logged, counted, guarded call."""
        icpt = self.interceptor

        async def run(request: web.Request) -> web.StreamResponse:
            start, call = time.perf_counter(), Call()
            code, message = grpc.StatusCode.OK, ""
            metadata = _metadata(request)
            route = _route(request, rpc)
            span = icpt._identify(route, metadata)
            if span is not None:  # the name is the pattern; the attributes say what was asked
                span.span.set_attribute("http.route", route)
                span.span.set_attribute("url.path", request.path)
            call.request_id = logs.request_id.get()
            try:
                icpt._begin(route, metadata, None)
                response = await handler(request, call)
                code, message = call.code, call.message
                response.headers.setdefault("x-request-id", call.request_id)
                return response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except web.HTTPRequestEntityTooLarge as exc:
                why = (exc.text or "too large").rstrip(".")
                too_large = BodyTooLarge(f"the request body is over --max-message-bytes ({why})")
                code, message = too_large.code, too_large.message
                return json_response(errors(code, message, too_large), 413, call.request_id)
            except BodyTimeout as exc:  # the rest of the body may never come: close after
                code, message = exc.code, exc.message
                response = json_response(errors(code, message, exc), 408, call.request_id)
                response.force_close()
                return response
            except Exception as exc:
                code, message = icpt._fail(exc, rpc)
                body = errors(code, message, exc)
                return json_response(body, http_status(code), call.request_id)
            finally:
                if self.cut and code == grpc.StatusCode.CANCELLED:
                    code = grpc.StatusCode.UNAVAILABLE
                icpt._end(rpc, call.model, code, start, message, span)

        return run

    def probe(self, handler: Handler, errors: ErrorBody) -> Handler:
        """A health endpoint: only the --auth-health guards, no log line, no metrics."""

        async def run(request: web.Request) -> web.StreamResponse:
            metadata = _metadata(request)
            try:
                for guard in self.health_guards:
                    guard(request.path, metadata)
                return await handler(request, Call())
            except Exception as exc:
                code, message = self.interceptor._fail(exc, request.path)
                return json_response(errors(code, message, exc), http_status(code))

        return run
