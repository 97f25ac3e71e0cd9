"""Server TLS / mutual TLS credentials from PEM files (--tls-cert, --tls-key, --tls-client-ca)."""

from __future__ import annotations

from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """The TLS flags are incomplete or a PEM file cannot be read."""


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """None when TLS is off; with `client_ca`, clients must present a certificate it signed."""
    if not cert and not key:
        if client_ca:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise TlsConfigError("--tls-cert and --tls-key must be given together")
    pair = [(_read("--tls-key", key), _read("--tls-cert", cert))]
    if client_ca:
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read("--tls-client-ca", client_ca), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)
