"""Optional bearer-token auth: a Guard for the call interceptor.

Why a guard and not a separate interceptor: the CallInterceptor already maps ServeErrors to
status codes and logs every call, so a refused call is counted and logged like any other
(without the token). Health and reflection never reach the guard (they are not rnnserve.v1
methods), so they stay open for load balancers and grpcurl, unless --auth-health adds
OpenServicesAuth.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import grpc

from rnnserve.server.errors import Unauthenticated
from rnnserve.server.interceptors import Guard, call_metadata

TOKENS_ENV = "RNNSERVE_TOKENS"


class TokenFileError(ValueError):
    """The tokens file cannot be read or holds no token, or a token cannot be sent."""


def load_tokens(tokens_file: str | Path | None, env: dict[str, str] | None = None) -> list[str]:
    """Tokens from the file (one per line, `#` comments) plus RNNSERVE_TOKENS (comma list).

    An empty result means auth is off. The file is UTF-8, a byte-order mark allowed (Windows
    editors write one, and it would otherwise stick to the first token). A token with a
    character outside printable ASCII is refused here: gRPC metadata cannot carry it, so no
    client could ever send it (a zero-width space pasted from a web page, say).
    """
    env = os.environ if env is None else env
    tokens: list[str] = []
    if tokens_file:
        path = Path(tokens_file)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise TokenFileError(f"cannot read tokens file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise TokenFileError(
                f"tokens file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
        for number, line in enumerate(text.splitlines(), 1):
            token = line.strip()
            if token and not token.startswith("#"):
                _check_sendable(token, f"tokens file {path}, line {number}")
                tokens.append(token)
        if not tokens:
            raise TokenFileError(f"tokens file {path} holds no token")
    for number, item in enumerate(env.get(TOKENS_ENV, "").split(","), 1):
        token = item.strip()
        if token:
            _check_sendable(token, f"{TOKENS_ENV}, item {number}")
            tokens.append(token)
    return sorted(set(tokens))


def _check_sendable(token: str, where: str) -> None:
    """Raises TokenFileError, naming where the token is but never the token itself."""
    if not all(" " <= ch <= "~" for ch in token):
        raise TokenFileError(
            f"{where}: the token has a character outside printable ASCII, which no client "
            "can send in gRPC metadata"
        )


def bearer_guard(tokens: list[str]) -> Guard:
    """A Guard that needs `authorization: Bearer <one of tokens>` metadata.

    Tokens are compared as SHA-256 digests: hmac.compare_digest returns at once for inputs of
    different lengths, which would tell a caller how long the tokens are.
    """
    secrets = [_digest(t) for t in tokens]

    def guard(method: str, metadata: dict[str, str]) -> None:
        # several values (call_metadata joins them by newlines) pass only when each is the
        # same bearer token: never does their order decide which one is checked
        values = metadata.get("authorization", "").split("\n")
        given = {_bearer(value) for value in values}
        if len(values) > 1 and (len(given) > 1 or "" in given):
            raise Unauthenticated(
                "several different 'authorization' values; send one 'Bearer <token>'"
            )
        (token,) = given
        if not token:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        candidate = _digest(token)
        ok = False
        for secret in secrets:  # no early exit: time does not depend on which token matched
            ok |= hmac.compare_digest(candidate, secret)
        if not ok:
            raise Unauthenticated("invalid bearer token")

    return guard


def _bearer(header: str) -> str:
    """The token of `Bearer <token>` (any case of the scheme); "" for anything else."""
    scheme, _, given = header.partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class OpenServicesAuth(grpc.aio.ServerInterceptor):
    """--auth-health: the guard also covers health checks and reflection.

    The CallInterceptor only sees rnnserve.v1 methods; this one refuses the others with
    UNAUTHENTICATED before their handler runs.
    """

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(OPEN_PREFIXES):
            return handler
        metadata = call_metadata(details.invocation_metadata or ())
        try:
            self.guard(details.method, metadata)
        except Unauthenticated as exc:
            return _denied(handler, exc.message)
        return handler


def _denied(handler, message: str):
    async def deny(request, context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kind = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
    )
    make = next(factory for behavior, factory in kind if behavior is not None)
    return make(
        deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
