"""rnnserve's Python client: RnnClient (blocking), AsyncRnnClient (asyncio), and rnn-client.

    from rnnserve.client import RnnClient
    with RnnClient("localhost:50051") as c:
        for event in c.generate("lstm", "the time", max_tokens=40):
            print(event.text, end="", flush=True)
        print(c.score("lstm", ["the time traveller"])[0].perplexity)

Never imports torch: it runs wherever grpcio does.

Names are imported when first used (PEP 562), so importing a submodule alone, as rnn-client
does, runs no grpc import it did not ask for: rnn-client quiets gRPC's C-core log lines
before grpc is loaded (client/cli.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rnnserve.client.async_client import AsyncRnnClient, AsyncTokenStream
    from rnnserve.client.connection import TlsConfig
    from rnnserve.client.errors import (
        Aborted,
        AlreadyExists,
        Cancelled,
        DataLoss,
        DeadlineExceeded,
        FailedPrecondition,
        Internal,
        InvalidArgument,
        NotFound,
        OutOfRange,
        PermissionDenied,
        ResourceExhausted,
        RnnServeError,
        Unauthenticated,
        Unavailable,
        Unimplemented,
        Unknown,
    )
    from rnnserve.client.results import (
        ForecastResult,
        InfillCandidate,
        ModelInfo,
        ReloadResult,
        ScoreResult,
        StateTensor,
        TokenEvent,
        VersionInfo,
    )
    from rnnserve.client.retry import NO_RETRY, RetryPolicy
    from rnnserve.client.sync_client import RnnClient, TokenStream

#: Each public name -> the module that defines it.
_EXPORTS = {
    "AsyncRnnClient": "rnnserve.client.async_client",
    "AsyncTokenStream": "rnnserve.client.async_client",
    "TlsConfig": "rnnserve.client.connection",
    "Aborted": "rnnserve.client.errors",
    "AlreadyExists": "rnnserve.client.errors",
    "Cancelled": "rnnserve.client.errors",
    "DataLoss": "rnnserve.client.errors",
    "DeadlineExceeded": "rnnserve.client.errors",
    "FailedPrecondition": "rnnserve.client.errors",
    "Internal": "rnnserve.client.errors",
    "InvalidArgument": "rnnserve.client.errors",
    "NotFound": "rnnserve.client.errors",
    "OutOfRange": "rnnserve.client.errors",
    "PermissionDenied": "rnnserve.client.errors",
    "ResourceExhausted": "rnnserve.client.errors",
    "RnnServeError": "rnnserve.client.errors",
    "Unauthenticated": "rnnserve.client.errors",
    "Unavailable": "rnnserve.client.errors",
    "Unimplemented": "rnnserve.client.errors",
    "Unknown": "rnnserve.client.errors",
    "ForecastResult": "rnnserve.client.results",
    "InfillCandidate": "rnnserve.client.results",
    "ModelInfo": "rnnserve.client.results",
    "ReloadResult": "rnnserve.client.results",
    "ScoreResult": "rnnserve.client.results",
    "StateTensor": "rnnserve.client.results",
    "TokenEvent": "rnnserve.client.results",
    "VersionInfo": "rnnserve.client.results",
    "NO_RETRY": "rnnserve.client.retry",
    "RetryPolicy": "rnnserve.client.retry",
    "RnnClient": "rnnserve.client.sync_client",
    "TokenStream": "rnnserve.client.sync_client",
}

__all__ = [
    "NO_RETRY",
    "Aborted",
    "AlreadyExists",
    "AsyncRnnClient",
    "AsyncTokenStream",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "ForecastResult",
    "InfillCandidate",
    "Internal",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ReloadResult",
    "ResourceExhausted",
    "RetryPolicy",
    "RnnClient",
    "RnnServeError",
    "ScoreResult",
    "StateTensor",
    "TlsConfig",
    "TokenEvent",
    "TokenStream",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "VersionInfo",
]


def __getattr__(name: str) -> Any:
    """Imports a public name on first use and keeps it (the next use is a plain lookup)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
