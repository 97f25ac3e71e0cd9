"""The HTTP port: one aiohttp application on the running (gRPC) event loop.

Why aiohttp: its server runs on the loop grpc.aio already owns (AppRunner + sites, no second
loop, thread or process manager), so handlers await the same Engine as the gRPC handlers;
it is one dependency, and its StreamResponse writes server-sent events with little overhead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger

from rnnserve.server.engine import Engine
from rnnserve.server.http.calls import HttpCalls, json_response
from rnnserve.server.http.kserve_routes import KServeRoutes
from rnnserve.server.http.openai_routes import OpenAIRoutes
from rnnserve.server.http.vllm_routes import VLLMRoutes
from rnnserve.server.interceptors import CallInterceptor, Guard
from rnnserve.server.kserve.status import KServeStatus

# a connection with no request under way (idle between requests, or never sending one, or
# stuck in its headers) is closed after this; aiohttp's default is an hour, so idle or
# slowloris connections piled up towards the process's file limit, which gRPC shares
IDLE_TIMEOUT_S = 75.0

# OpenAI routes a client may try that are not served, and what to use instead
NOT_SERVED = {
    "/v1/chat/completions": "chat completions are not served (these models have no chat "
    "format: roles, template); send the text as `prompt` to POST /v1/completions",
    "/v1/embeddings": "embeddings are not served; POST /v1/completions generates text",
}


@web.middleware
async def json_not_found(request: web.Request, handler) -> web.StreamResponse:
    """Unknown paths and methods answer JSON too, in both protocols' shape."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        why = NOT_SERVED.get(request.path.rstrip("/"), exc.reason)
        message = f"{request.method} {request.path}: {why}"
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": str(exc.status)}}  # fmt: skip
        if request.path.startswith("/v2"):
            body = {"error": message}
        response = json_response(body, exc.status)
        if "Allow" in exc.headers:  # RFC 9110: a 405 lists the methods the path takes
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def _client_fault(exc: BaseException | None) -> str | None:
    """Why the request was malformed, when that is what `exc` says (aiohttp answers it 400);
    None for anything else."""
    if isinstance(exc, web.RequestPayloadError):  # a body that does not decode (read_body)
        exc = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
        return " ".join((getattr(exc, "message", "") or str(exc)).split())
    if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
        return " ".join(str(exc.message).split())
    return None


class ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger, with a client's malformed request told in one INFO line.

    aiohttp logs a request it cannot parse (a bad request line, a header over 8 KiB, a body
    its Content-Encoding does not decode) with ERROR and a traceback while it answers 400:
    a port scanner or one broken client would fill the log with errors an operator cannot
    act on (and page them). Anything else stays an ERROR with its traceback."""

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:  # type: ignore[override]
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        why = _client_fault(exc)
        if why is None:
            self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)
        else:
            self.logger.info(f"{msg} (a malformed request, answered 400): %s", *args, why)


CALLS = web.AppKey("calls", HttpCalls)  # the app's HttpCalls, which HttpServer.stop marks cut


def build_web_app(
    engine: Engine,
    status: KServeStatus,
    interceptor: CallInterceptor,
    health_guards: list[Guard],
    max_body: int,
) -> web.Application:
    calls = HttpCalls(interceptor, health_guards)
    app = web.Application(client_max_size=max_body, middlewares=[json_not_found])
    app[CALLS] = calls
    app.add_routes(OpenAIRoutes(engine, status.health).routes(calls))
    app.add_routes(KServeRoutes(engine, status).routes(calls))
    app.add_routes(VLLMRoutes(engine, status).routes(calls))
    return app


class HttpServer:
    """Binds at construction (so the port is known and a taken port fails early, like
    gRPC's add_port), serves after start(), stops within a grace period."""

    def __init__(
        self,
        app: web.Application,
        sockets: list[socket.socket],
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.app = app
        self.sockets = sockets
        self.ssl_context = ssl_context
        self.port = sockets[0].getsockname()[1]
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.runner = web.AppRunner(
            self.app,
            access_log=None,
            handler_cancellation=True,
            logger=ServerLog(server_logger, {}),
            keepalive_timeout=IDLE_TIMEOUT_S,
        )
        await self.runner.setup()
        for sock in self.sockets:
            await web.SockSite(self.runner, sock, ssl_context=self.ssl_context).start()

    async def stop(self, grace: float) -> None:
        """Stops listening; in-flight requests get `grace` seconds, then are cancelled.

        aiohttp's own shutdown waits `grace` for a handler, then only fails its body reads
        (which a stream writing events never notices) and waits `grace` again before it
        cancels it: a server-sent event stream ran twice --grace, past the pod's termination
        budget. So at `grace` the connections still open are closed here, which cancels
        their handlers (handler_cancellation), as gRPC cancels its calls."""
        if self.runner is None:
            for sock in self.sockets:
                sock.close()
            return
        runner, server = self.runner, self.runner.server
        runner._shutdown_timeout = grace  # aiohttp reads it in cleanup()
        cleanup = asyncio.ensure_future(runner.cleanup())
        done, _ = await asyncio.wait({cleanup}, timeout=grace)
        if not done and server is not None:
            calls = self.app.get(CALLS)
            if calls is not None:  # what is cut from here on counts as the server's failure
                calls.cut = True
            for connection in server.connections:
                connection.force_close()
        await cleanup
        self.runner = None
