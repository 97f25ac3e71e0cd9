"""server.auth (token loading, the bearer guard, its place in the call interceptor) and
server.tls (flag combinations)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from rnnserve.server.auth import (
    ADMIN_TOKENS_ENV,
    PermissionDenied,
    TokenFileError,
    access_guard,
    bearer_guard,
    load_tokens,
)
from rnnserve.server.errors import BadRequest, Unauthenticated, UnknownModel
from rnnserve.server.interceptors import (
    MAX_MESSAGE_BYTES,
    CallInterceptor,
    _Unparsable,
    bounded,
    call_metadata,
)
from rnnserve.server.tls import TlsConfigError, server_credentials

METHOD = "/rnnserve.v1.Inference/Generate"
RELOAD = "/rnnserve.v1.Admin/ReloadModels"


def test_tokens_from_file_and_env(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("# comment\n  alpha  \n\nbeta\n")
    assert load_tokens(f, {"RNNSERVE_TOKENS": "gamma, ,beta"}) == ["alpha", "beta", "gamma"]
    assert load_tokens(None, {}) == []
    assert load_tokens("", {"RNNSERVE_TOKENS": "x"}) == ["x"]


def test_admin_tokens_come_from_their_own_file_and_variable(tmp_path: Path) -> None:
    f = tmp_path / "admin.txt"
    f.write_text("# operators\nroot-a\n")
    env = {"RNNSERVE_TOKENS": "user", ADMIN_TOKENS_ENV: "root-b"}
    assert load_tokens(f, env, variable=ADMIN_TOKENS_ENV) == ["root-a", "root-b"]
    assert load_tokens(None, env) == ["user"]


def test_bad_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read"):
        load_tokens(tmp_path / "nope", {})
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n")
    with pytest.raises(TokenFileError, match="no token"):
        load_tokens(empty, {})


def test_tokens_file_with_crlf_and_a_byte_order_mark(tmp_path: Path) -> None:
    """A file saved by a Windows editor: the BOM must not stick to the first token."""
    f = tmp_path / "t.txt"
    f.write_bytes("\ufeffalpha\r\nbeta\r\n".encode())
    assert load_tokens(f, {}) == ["alpha", "beta"]


def test_tokens_file_that_is_not_utf8_is_a_token_file_error(tmp_path: Path) -> None:
    """Was a UnicodeDecodeError traceback at start (a UTF-16 file from PowerShell)."""
    f = tmp_path / "t.txt"
    f.write_bytes("alpha\n".encode("utf-16"))
    with pytest.raises(TokenFileError, match="not UTF-8"):
        load_tokens(f, {})


@pytest.mark.parametrize("where", ["file", "env"])
def test_a_token_no_client_can_send_is_refused_without_echoing_it(
    tmp_path: Path, where: str
) -> None:
    """A zero-width space pasted with the token: gRPC metadata cannot carry it, so the token
    could never match; the error says where it is, not what it is."""
    token = "alpha\u200b"
    f = tmp_path / "t.txt"
    f.write_text(f"ok-token\n{token}\n" if where == "file" else "ok-token\n")
    env = {"RNNSERVE_TOKENS": f"x,{token}"} if where == "env" else {}
    with pytest.raises(TokenFileError, match="line 2" if where == "file" else "item 2") as info:
        load_tokens(f, env)
    assert "alpha" not in str(info.value)


@pytest.fixture
def compared_lengths(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The lengths of every pair hmac.compare_digest is given from now on."""
    import hmac

    lengths: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        lengths.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return lengths


def test_bearer_guard_compares_equal_length_digests(compared_lengths) -> None:
    """compare_digest returns at once on a length mismatch, which would leak token lengths."""
    lengths = compared_lengths
    guard = bearer_guard(["alpha", "a-much-longer-token"])
    with pytest.raises(Unauthenticated):
        guard(METHOD, {"authorization": "Bearer x"})
    guard(METHOD, {"authorization": "Bearer alpha"})
    assert lengths and all(a == b for a, b in lengths)


def test_bearer_guard_refuses_undecodable_header_bytes() -> None:
    """aiohttp hands on non-UTF-8 header bytes as surrogates: UNAUTHENTICATED, not INTERNAL."""
    with pytest.raises(Unauthenticated):
        bearer_guard(["alpha"])(METHOD, {"authorization": "Bearer \udcff\udcfe"})


@pytest.mark.parametrize(
    "header, ok",
    [
        ("Bearer alpha", True),
        ("bearer beta", True),
        ("Bearer  alpha ", True),
        ("Bearer alph", False),
        ("Bearer alphaa", False),
        ("Basic alpha", False),
        ("alpha", False),
        ("Bearer ", False),
        ("", False),
    ],
)
def test_bearer_guard(header: str, ok: bool) -> None:
    guard = bearer_guard(["alpha", "beta"])
    metadata = {"authorization": header} if header else {}
    if ok:
        guard(METHOD, metadata)
    else:
        with pytest.raises(Unauthenticated) as info:
            guard(METHOD, metadata)
        assert "alpha" not in str(info.value)


@pytest.mark.parametrize(
    "values, ok",
    [
        (["Bearer alpha", "Bearer alpha"], True),
        (["Bearer alpha", "bearer  alpha "], True),  # the same token, written differently
        (["Bearer alpha", "Bearer beta"], False),  # both valid: which one is the caller?
        (["Bearer alpha", "Bearer wrong"], False),
        (["Bearer wrong", "Bearer alpha"], False),
        (["Bearer alpha", "Basic alpha"], False),
    ],
)
def test_several_authorization_values_pass_only_as_one_token(values: list[str], ok) -> None:
    """The last value used to win: acceptance depended on the order of the headers."""
    guard = bearer_guard(["alpha", "beta"])
    metadata = call_metadata([("user-agent", "x"), *(("authorization", v) for v in values)])
    assert metadata["user-agent"] == "x"
    if ok:
        guard(METHOD, metadata)
    else:
        with pytest.raises(Unauthenticated, match="several different 'authorization'"):
            guard(METHOD, metadata)


OK, DENIED, UNKNOWN = None, PermissionDenied, Unauthenticated


@pytest.mark.parametrize(
    "tokens, method, token, outcome",
    [
        # both kinds: Admin needs an admin token; an admin token also calls inference
        (["user"], RELOAD, "root", OK),
        (["user"], RELOAD, "user", DENIED),  # known, not allowed: not UNAUTHENTICATED
        (["user"], RELOAD, "wrong", UNKNOWN),
        (["user"], RELOAD, "", UNKNOWN),
        (["user"], METHOD, "user", OK),
        (["user"], METHOD, "root", OK),
        (["user"], METHOD, "wrong", UNKNOWN),
        (["user"], "/v2/models/{name}/infer", "root", OK),  # an HTTP route: not Admin
        # admin tokens only: inference stays open, Admin is closed
        ([], METHOD, "", OK),
        ([], RELOAD, "", UNKNOWN),
        ([], RELOAD, "root", OK),
    ],
)
def test_admin_tokens_guard_the_admin_service(
    tokens: list[str], method: str, token: str, outcome: type[Exception] | None
) -> None:
    guard = access_guard(tokens, ["root"])
    assert guard is not None
    metadata = {"authorization": f"Bearer {token}"} if token else {}
    if outcome is None:
        guard(method, metadata)
    else:
        with pytest.raises(outcome) as info:
            guard(method, metadata)
        assert type(info.value) is outcome
        assert "root" not in info.value.message and "user" not in info.value.message


def test_admin_refusals_have_their_status_codes() -> None:
    """PERMISSION_DENIED tells an operator the token is right but its kind wrong."""
    interceptor = CallInterceptor(None, str, [access_guard(["user"], ["root"])])  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied) as denied:
        interceptor._begin(RELOAD, {"authorization": "Bearer user"}, None)
    assert interceptor._fail(denied.value, "ReloadModels")[0] == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(Unauthenticated) as unknown:
        interceptor._begin(RELOAD, {"authorization": "Bearer nobody"}, None)
    assert interceptor._fail(unknown.value, "ReloadModels")[0] == grpc.StatusCode.UNAUTHENTICATED


def test_without_admin_tokens_every_token_may_reload_as_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING"):
        assert access_guard([], []) is None
    assert not caplog.records, "no token at all: nothing to warn about"
    with caplog.at_level("WARNING"):
        guard = access_guard(["user"], [])
    assert guard is not None
    guard(RELOAD, {"authorization": "Bearer user"})
    with pytest.raises(Unauthenticated):
        guard(RELOAD, {"authorization": "Bearer root"})
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "--admin-tokens-file" in caplog.text and "user" not in caplog.text


def test_the_admin_guard_compares_equal_length_digests(compared_lengths) -> None:
    lengths = compared_lengths
    guard = access_guard(["user"], ["a-much-longer-admin-token"])
    assert guard is not None
    with pytest.raises(PermissionDenied):
        guard(RELOAD, {"authorization": "Bearer user"})
    assert lengths and all(a == b for a, b in lengths)


def test_guards_run_before_the_request_is_judged_unparsable() -> None:
    """A caller with no token sending garbage bytes got INVALID_ARGUMENT with the protobuf
    parse error, not UNAUTHENTICATED: it learnt about the API before authenticating."""
    interceptor = CallInterceptor(None, str, [bearer_guard(["alpha"])])  # type: ignore[arg-type]
    garbage = _Unparsable(ValueError("Error parsing message"))
    with pytest.raises(Unauthenticated):
        interceptor._begin(METHOD, {}, garbage)
    with pytest.raises(BadRequest):
        interceptor._begin(METHOD, {"authorization": "Bearer alpha"}, garbage)


@pytest.mark.parametrize("echoed", ["x" * 20_000, "\U0001f600" * 1_400])
def test_error_messages_that_echo_a_huge_input_are_cut(echoed: str) -> None:
    """`model 'xxx...' is not in the repository` with a 20 kB name overflowed the client's
    metadata limit: it got RESOURCE_EXHAUSTED "Stream removed", not NOT_FOUND."""
    interceptor = CallInterceptor(None, str)  # type: ignore[arg-type]
    code, message = interceptor._fail(UnknownModel(f"model {echoed!r} is not here"), "Score")
    assert code == grpc.StatusCode.NOT_FOUND
    assert len(message.encode()) <= MAX_MESSAGE_BYTES + 64
    assert message.startswith("model '") and message.endswith("' is not here")
    assert "characters cut" in message
    assert bounded("short") == "short"


def test_an_http_401_names_the_bearer_scheme() -> None:
    """RFC 9110: a 401 must carry WWW-Authenticate; it had none on either HTTP protocol."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from rnnserve.server.http.calls import HttpCalls, json_response
    from rnnserve.server.http.errors import kserve_error
    from rnnserve.server.metrics import Metrics

    async def hello(request, call):
        return json_response({"hello": True})

    async def run() -> list[tuple[int, str | None]]:
        guard = bearer_guard(["alpha"])
        calls = HttpCalls(CallInterceptor(Metrics(), str, [guard]), [guard])
        app = web.Application()
        app.router.add_get("/api", calls.endpoint("test.Api", hello, kserve_error))
        app.router.add_get("/probe", calls.probe(hello, kserve_error))
        async with TestClient(TestServer(app)) as client:
            seen = []
            for path, headers in [("/api", {}), ("/probe", {}),
                                  ("/api", {"Authorization": "Bearer alpha"})]:  # fmt: skip
                response = await client.get(path, headers=headers)
                seen.append((response.status, response.headers.get("WWW-Authenticate")))
            return seen

    assert asyncio.run(run()) == [
        (401, 'Bearer realm="rnnserve"'),
        (401, 'Bearer realm="rnnserve"'),
        (200, None),
    ]


def test_auth_health_without_any_token_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--auth-health 1 with no token left every call open, health included, without a word."""
    import asyncio

    from rnnserve.server.main import serve
    from rnnserve.server.settings import Settings

    monkeypatch.delenv("RNNSERVE_TOKENS", raising=False)
    settings = Settings(
        auth_health=1, model_repo="/nonexistent", port=0, metrics_port=0, http_port=0
    )
    with caplog.at_level("ERROR"):  # the bound only stops a server that did start
        assert asyncio.run(asyncio.wait_for(serve(settings), 60)) == 2
    assert "--auth-health 1 needs a token" in caplog.text


def test_tls_flag_combinations(tmp_path: Path) -> None:
    assert server_credentials("", "") is None
    with pytest.raises(TlsConfigError, match="together"):
        server_credentials("cert.pem", "")
    with pytest.raises(TlsConfigError, match="needs"):
        server_credentials("", "", "ca.pem")
    with pytest.raises(TlsConfigError, match="cannot read"):
        server_credentials(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))


@pytest.mark.parametrize("which", ["pair", "client_ca"])
def test_tls_files_that_are_not_pem_name_their_flag(tmp_path: Path, which: str) -> None:
    """grpc would only say "Failed to bind to address"; the error must name the file."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    if which == "pair":
        with pytest.raises(TlsConfigError, match=r"--tls-cert .*junk\.pem / --tls-key"):
            server_credentials(str(junk), str(junk))
    else:
        with pytest.raises(TlsConfigError, match="--tls-cert"):  # the pair is checked first
            server_credentials(str(junk), str(junk), str(junk))
