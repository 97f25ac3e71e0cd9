"""Domain errors raised by pure server code; `status_for` is the one place they become codes.

Handlers and the logic below them never touch grpc status codes: they raise one of these,
and the call interceptor (server/interceptors.py) turns it into the documented status.
Anything that is not a ServeError is a bug and becomes INTERNAL (and is logged).
"""

from __future__ import annotations

import grpc


class ServeError(Exception):
    """Base of every error a client is meant to see; `code` is its gRPC status."""

    code = grpc.StatusCode.INTERNAL

    @property
    def message(self) -> str:
        return str(self)


class BadRequest(ServeError):
    """A request field is malformed or out of range: INVALID_ARGUMENT naming the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


class UnknownModel(ServeError):
    """No such model or version in the repository: NOT_FOUND."""

    code = grpc.StatusCode.NOT_FOUND


class UnsupportedTask(ServeError):
    """The model cannot do what was asked (or is NOT_SERVING): FAILED_PRECONDITION."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OtherWeights(ServeError):
    """A resume token made by other weights under the same model and version (a version
    number reused for a new export): FAILED_PRECONDITION, which failover passes over to a
    replica that still serves the token's weights."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(ServeError):
    """A server limit is reached (concurrent streams): RESOURCE_EXHAUSTED; retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServeError):
    """No valid credentials (used by the auth interceptor): UNAUTHENTICATED."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ShuttingDown(ServeError):
    """The server is draining: UNAVAILABLE, so clients retry on another replica."""

    code = grpc.StatusCode.UNAVAILABLE


class EngineUnavailable(ServeError):
    """The decode process of a model exited (or could not start): UNAVAILABLE, so the
    client resumes or retries; the next call starts a new one."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServeError):
    """The client's deadline passed while the call was running."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


DEADLINE_PASSED = "the call's deadline passed"  # what every call past its deadline is told


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps an exception to (code, message). Unknown exceptions are INTERNAL, message hidden."""
    if isinstance(exc, ServeError):
        return exc.code, exc.message
    return grpc.StatusCode.INTERNAL, "internal error (logged on the server)"
