"""gRPC status -> HTTP status, and the two JSON error bodies (OpenAI's and KServe's).

Domain errors keep their one mapping to a gRPC code (server/errors.py); this table is the
only place that code becomes an HTTP status. docs/protocols.md shows it.
"""

from __future__ import annotations

import grpc

from rnnserve.server.errors import BadRequest, ServeError


class BodyTooLarge(ServeError):
    """A body over --max-message-bytes: HTTP 413, and INVALID_ARGUMENT, the caller's mistake
    (retrying cannot help). gRPC's own message limit says RESOURCE_EXHAUSTED, but that call
    never reaches the metrics; counted here under it, a client sending oversized bodies made
    the server-side error-rate alert fire, where RESOURCE_EXHAUSTED means --max-streams is
    full."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BodyTimeout(ServeError):
    """A body not received within BODY_TIMEOUT_S (a client that stalled, or a slowloris
    holding the connection): HTTP 408 Request Timeout. Its code is CANCELLED, as for a client
    that left: DEADLINE_EXCEEDED counts in the server-side error-rate alert, and a stalled
    client is no sign of a slow server."""

    code = grpc.StatusCode.CANCELLED


class ClientGone(ServeError):
    """The client closed its connection before its whole body was read: CANCELLED, as for a
    client that leaves mid-stream. aiohttp raises ConnectionResetError from the read, which
    was an INTERNAL 500 with a traceback (and counted as a server error) for the client's
    own act."""

    code = grpc.StatusCode.CANCELLED


HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

OPENAI_TYPE = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request_error",
    grpc.StatusCode.FAILED_PRECONDITION: "invalid_request_error",
    grpc.StatusCode.NOT_FOUND: "invalid_request_error",
    grpc.StatusCode.UNAUTHENTICATED: "authentication_error",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limit_error",
}

# Native field names -> the OpenAI request's names, for the error's `param`.
OPENAI_PARAM = {
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.seed": "seed",
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def openai_error(code: grpc.StatusCode, message: str, exc: BaseException | None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    param = "model" if code == grpc.StatusCode.NOT_FOUND else None
    if isinstance(exc, BadRequest):
        field = exc.field.split("[", 1)[0]
        param = OPENAI_PARAM.get(field, field)
        if field in OPENAI_PARAM:  # told by the request's name, not the native field's
            message = f"{param}{exc.field[len(field) :]}: {exc.why}"
        if param == "request":  # the body as a whole (not JSON, not an object): no field
            param = None
    name = "model_not_found" if code == grpc.StatusCode.NOT_FOUND else code.name.lower()
    kind = OPENAI_TYPE.get(code, "server_error")
    if isinstance(exc, BodyTimeout):  # the request's fault, not a server error
        kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": name}}


def kserve_error(code: grpc.StatusCode, message: str, exc: BaseException | None) -> dict:
    """The Open Inference Protocol's error object: {"error": "<message>"}."""
    return {"error": message}
