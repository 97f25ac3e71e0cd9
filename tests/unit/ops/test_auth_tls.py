"""server.auth (token loading, the bearer guard) and server.tls (flag combinations)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnserve.server.auth import TokenFileError, bearer_guard, load_tokens
from rnnserve.server.errors import Unauthenticated
from rnnserve.server.tls import TlsConfigError, server_credentials

METHOD = "/rnnserve.v1.Inference/Generate"


def test_tokens_from_file_and_env(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("# comment\n  alpha  \n\nbeta\n")
    assert load_tokens(f, {"RNNSERVE_TOKENS": "gamma, ,beta"}) == ["alpha", "beta", "gamma"]
    assert load_tokens(None, {}) == []
    assert load_tokens("", {"RNNSERVE_TOKENS": "x"}) == ["x"]


def test_bad_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read"):
        load_tokens(tmp_path / "nope", {})
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n")
    with pytest.raises(TokenFileError, match="no token"):
        load_tokens(empty, {})


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
