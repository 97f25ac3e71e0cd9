"""rnnserve's Python client: RnnClient (blocking), AsyncRnnClient (asyncio), and rnn-client.

    from rnnserve.client import RnnClient
    with RnnClient("localhost:50051") as c:
        for event in c.generate("lstm", "the time", max_tokens=40):
            print(event.text, end="", flush=True)
        print(c.score("lstm", ["the time traveller"])[0].perplexity)

Never imports torch: it runs wherever grpcio does.
"""

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
