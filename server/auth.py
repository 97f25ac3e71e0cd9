"""Optional bearer-token auth: a Guard for the call interceptor.

Why a guard and not a separate interceptor: the CallInterceptor already maps ServeErrors to
status codes and logs every call, so a refused call is counted and logged like any other
(without the token). Health and reflection never reach the guard (they are not rnnserve.v1
methods), so they stay open for load balancers and grpcurl, unless --auth-health adds
OpenServicesAuth.

With admin tokens (--admin-tokens-file, RNNSERVE_ADMIN_TOKENS), rnnserve.v1.Admin calls need
one of them: an inference token there is PERMISSION_DENIED (a known caller, not allowed). An
admin token may call everything, inference included, so one operator credential does a
reload and checks its result. Without admin tokens every token may call Admin, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

import grpc

from rnnserve.server.errors import ServeError, Unauthenticated
from rnnserve.server.interceptors import Guard, call_metadata

log = logging.getLogger(__name__)

TOKENS_ENV = "RNNSERVE_TOKENS"
ADMIN_TOKENS_ENV = "RNNSERVE_ADMIN_TOKENS"
ADMIN_PREFIX = "/rnnserve.v1.Admin/"


class PermissionDenied(ServeError):
    """A valid token that may not call this method (an inference token on Admin)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class TokenFileError(ValueError):
    """The tokens file cannot be read or holds no token, or a token cannot be sent."""


def load_tokens(
    tokens_file: str | Path | None,
    env: dict[str, str] | None = None,
    variable: str = TOKENS_ENV,
) -> list[str]:
    """Tokens from the file (one per line, `#` comments) plus `variable` (a comma list in
    the environment: RNNSERVE_TOKENS, or RNNSERVE_ADMIN_TOKENS for the admin file).

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
    for number, item in enumerate(env.get(variable, "").split(","), 1):
        token = item.strip()
        if token:
            _check_sendable(token, f"{variable}, item {number}")
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
        if not _matches(_digest(_presented(metadata)), secrets):
            raise Unauthenticated("invalid bearer token")

    return guard


def access_guard(tokens: list[str], admin_tokens: list[str]) -> Guard | None:
    """The guard `rnn-server` runs: None when no token of either kind is configured.

    Without admin tokens, `bearer_guard(tokens)`, exactly as before they existed (and a
    warning: every inference token may reload). With them, Admin methods need an admin
    token, an inference token there being PERMISSION_DENIED; other methods take either kind,
    and stay open when only admin tokens are configured.
    """
    if not admin_tokens:
        if tokens:
            log.warning(
                "every --tokens-file token may call Admin.ReloadModels; set "
                "--admin-tokens-file (or %s) to keep reloads to operators",
                ADMIN_TOKENS_ENV,
            )
        return bearer_guard(tokens) if tokens else None
    users = [_digest(t) for t in tokens]
    admins = [_digest(t) for t in admin_tokens]

    def guard(method: str, metadata: dict[str, str]) -> None:
        admin_call = method.startswith(ADMIN_PREFIX)
        if not admin_call and not users:
            return  # inference is open: only Admin is closed
        candidate = _digest(_presented(metadata))
        is_admin = _matches(candidate, admins)
        is_user = _matches(candidate, users)  # both checked: time says nothing of which
        if is_admin or (is_user and not admin_call):
            return
        if is_user:
            raise PermissionDenied(
                "this token may not call rnnserve.v1.Admin methods; they need an admin token"
            )
        raise Unauthenticated("invalid bearer token")

    return guard


def _presented(metadata: dict[str, str]) -> str:
    """The one bearer token of the call; raises Unauthenticated when there is none.

    Several values (call_metadata joins them by newlines) pass only when each is the same
    bearer token: never does their order decide which one is checked."""
    values = metadata.get("authorization", "").split("\n")
    given = {_bearer(value) for value in values}
    if len(values) > 1 and (len(given) > 1 or "" in given):
        raise Unauthenticated("several different 'authorization' values; send one 'Bearer <token>'")
    (token,) = given
    if not token:
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
    return token


def _matches(candidate: bytes, secrets: list[bytes]) -> bool:
    """Whether `candidate` is one of `secrets`, in a time that does not depend on which."""
    ok = False
    for secret in secrets:  # no early exit
        ok |= hmac.compare_digest(candidate, secret)
    return ok


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
        except ServeError as exc:
            return _denied(handler, exc.message, exc.code)
        return handler


def _denied(handler, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED):
    async def deny(request, context) -> None:
        await context.abort(code, message)

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
