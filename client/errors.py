"""Client-side exceptions: one class per gRPC status, so callers catch what they can handle.

Why: callers should not need to import grpc to tell "unknown model" from "server down", and the
CLI turns each class into its own exit code (see `exit_code`).
"""

from __future__ import annotations

import grpc

#: Details of the Cancelled that ends a call or stream whose client close() closed (the words
#: grpc itself uses for a sync stream on a closed channel).
CLIENT_CLOSED = "Channel closed!"


class RnnServeError(Exception):
    """A failed call. `code` is the gRPC status name (e.g. "NOT_FOUND"), `details` its message."""

    code: str = "UNKNOWN"
    #: Process exit code used by `rnn-client` for this status (the gRPC status number).
    exit_code: int = 2

    def __init__(self, details: str = "", *, code: str | None = None) -> None:
        super().__init__(details)
        if code is not None:
            self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code}: {self.details}" if self.details else self.code


class Cancelled(RnnServeError):
    code, exit_code = "CANCELLED", 1


class Unknown(RnnServeError):
    code, exit_code = "UNKNOWN", 2


class InvalidArgument(RnnServeError):
    code, exit_code = "INVALID_ARGUMENT", 3


class DeadlineExceeded(RnnServeError):
    code, exit_code = "DEADLINE_EXCEEDED", 4


class NotFound(RnnServeError):
    code, exit_code = "NOT_FOUND", 5


class AlreadyExists(RnnServeError):
    code, exit_code = "ALREADY_EXISTS", 6


class PermissionDenied(RnnServeError):
    code, exit_code = "PERMISSION_DENIED", 7


class ResourceExhausted(RnnServeError):
    code, exit_code = "RESOURCE_EXHAUSTED", 8


class FailedPrecondition(RnnServeError):
    code, exit_code = "FAILED_PRECONDITION", 9


class Aborted(RnnServeError):
    code, exit_code = "ABORTED", 10


class OutOfRange(RnnServeError):
    code, exit_code = "OUT_OF_RANGE", 11


class Unimplemented(RnnServeError):
    code, exit_code = "UNIMPLEMENTED", 12


class Internal(RnnServeError):
    code, exit_code = "INTERNAL", 13


class Unavailable(RnnServeError):
    code, exit_code = "UNAVAILABLE", 14


class DataLoss(RnnServeError):
    code, exit_code = "DATA_LOSS", 15


class Unauthenticated(RnnServeError):
    code, exit_code = "UNAUTHENTICATED", 16


_BY_CODE: dict[grpc.StatusCode, type[RnnServeError]] = {
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNKNOWN: Unknown,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_class(code: grpc.StatusCode) -> type[RnnServeError]:
    """The exception class for a gRPC status code (Unknown for anything unmapped)."""
    return _BY_CODE.get(code, Unknown)


def from_rpc_error(err: grpc.RpcError) -> RnnServeError:
    """Translate a grpc.RpcError (sync or aio) into our hierarchy, keeping code and details."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or ""
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    return error_class(code)(details, code=code.name)


def exit_codes() -> dict[str, int]:
    """Status name -> rnn-client exit code, for documentation and tests."""
    return {cls.code: cls.exit_code for cls in _BY_CODE.values()}
