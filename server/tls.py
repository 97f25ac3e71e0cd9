"""Server TLS / mutual TLS credentials from PEM files (--tls-cert, --tls-key, --tls-client-ca)."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """The TLS flags are incomplete or a PEM file cannot be read."""


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from None


def _no_password() -> bytes:
    """An encrypted key fails here instead of OpenSSL prompting on a terminal."""
    return b""


def check_pem(cert: str, key: str, client_ca: str = "") -> None:
    """Raises TlsConfigError naming the flag when a PEM file is not what it should be.

    Why: grpc only says "Failed to bind to address ..." for a file that is not PEM, a key
    that does not match the certificate or a CA file with no certificate, which sends an
    operator looking for a port conflict. OpenSSL's key-size policy is lowered to 0: this
    checks the files, not how strong they are (grpc decides that).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its unencrypted "
            f"private key ({exc.reason or exc})"
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                f"--tls-client-ca {client_ca}: not a PEM CA certificate ({exc.reason or exc})"
            ) from None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """None when TLS is off; with `client_ca`, clients must present a certificate it signed."""
    if not cert and not key:
        if client_ca:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise TlsConfigError("--tls-cert and --tls-key must be given together")
    pair = [(_read("--tls-key", key), _read("--tls-cert", cert))]
    ca = _read("--tls-client-ca", client_ca) if client_ca else None
    check_pem(cert, key, client_ca)
    if ca is not None:
        return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=True)
    return grpc.ssl_server_credentials(pair)
