"""Listening sockets and TLS for the HTTP port, from the same flags as the gRPC port.

Why own sockets: asyncio binds "[::]" IPv6-only and gives each address of a name like
"localhost" its own ephemeral port; one port for every address (and one dual-stack socket
for "[::]", as gRPC does) keeps `--http-port 0` and 127.0.0.1 clients working.
"""

from __future__ import annotations

import errno
import socket
import ssl

from rnnserve.server.tls import TlsConfigError

ANY = ("", "[::]", "::", "*")
UNAVAILABLE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)  # the address, not the port


def _bind(family: int, address: tuple, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if address[0] == "::" else 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind(host: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Sockets for every address of `host`, all on one port (the first one's when port is 0)."""
    if host in ANY:
        try:
            return [_bind(socket.AF_INET6, ("::", port), reuse_port)]
        except OSError:  # no IPv6 here
            return [_bind(socket.AF_INET, ("0.0.0.0", port), reuse_port)]
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    seen, sockets, missing = set(), [], None
    try:
        for family, _, _, _, address in infos:
            if address[0] in seen:
                continue
            seen.add(address[0])
            if sockets:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sockets.append(_bind(family, address, reuse_port))
            except OSError as exc:
                # "localhost" still names ::1 where IPv6 is off: skip an address this host
                # does not have, as gRPC does, but never one whose port is taken
                if exc.errno not in UNAVAILABLE:
                    raise
                missing = missing or exc
    except OSError:
        for s in sockets:
            s.close()
        raise
    if not sockets:
        raise missing or OSError(f"{host!r} has no address to listen on")
    return sockets


def ssl_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext | None:
    """The HTTP twin of server_credentials(): None when TLS is off."""
    if not cert and not key:
        if client_ca:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise TlsConfigError("--tls-cert and --tls-key must be given together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"TLS for the HTTP port: {exc}") from None
    return context
