"""HTTP listening sockets and TLS context from the server flags."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from rnnserve.server.http.listen import bind, ssl_context
from rnnserve.server.tls import TlsConfigError


def test_every_address_of_a_name_shares_one_port() -> None:
    sockets = bind("localhost", 0)
    try:
        ports = {s.getsockname()[1] for s in sockets}
        assert len(ports) == 1 and ports.pop() > 0
    finally:
        for s in sockets:
            s.close()


def test_any_address_is_one_dual_stack_socket() -> None:
    (sock,) = bind("[::]", 0)
    try:
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # an IPv4 client reaches the "[::]" socket
    finally:
        sock.close()


def test_an_address_the_host_lacks_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name can resolve to an address this host cannot bind (::1 for "localhost" where IPv6
    is off; 192.0.2.1 here): the others still serve, as with gRPC."""
    real = socket.getaddrinfo

    def resolve(host, port, *args, **kwargs):
        ours = real("127.0.0.1", port, *args, **kwargs)
        family, kind, proto, _, _ = ours[0]
        return [(family, kind, proto, "", ("192.0.2.1", port)), *ours]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    sockets = bind("dual.example", 0)
    try:
        assert [s.getsockname()[0] for s in sockets] == ["127.0.0.1"]
    finally:
        for s in sockets:
            s.close()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: resolve(*a, **k)[:1])
    with pytest.raises(OSError):  # nothing to listen on at all
        bind("dual.example", 0)


def test_a_taken_port_fails_at_bind() -> None:
    (first,) = bind("127.0.0.1", 0)
    try:
        with pytest.raises(OSError) as err:
            bind("127.0.0.1", first.getsockname()[1])
        assert err.value.errno == errno.EADDRINUSE, err.value
    finally:
        first.close()


def test_tls_flags_are_checked_like_grpc(tmp_path: Path) -> None:
    assert ssl_context("", "") is None
    with pytest.raises(TlsConfigError, match="together"):
        ssl_context("cert.pem", "")
    with pytest.raises(TlsConfigError, match="needs --tls-cert"):
        ssl_context("", "", "ca.pem")
    with pytest.raises(TlsConfigError, match="HTTP port"):
        ssl_context(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))
