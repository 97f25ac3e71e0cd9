"""Connection settings shared by both clients: address, TLS, bearer token, default deadline.

Why: the sync and async clients build channels the same way; keeping it here means TLS/mTLS
and auth behave identically whichever one a caller picks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT = 30.0  # seconds per call (per whole stream for Generate)

# Large enough for Score's per-token log-probs on long texts.
_CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings. No root CA: the system roots. cert+key together: mutual TLS.
    server_name overrides the name checked against the server certificate."""

    root_ca: bytes | None = None
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_chain is None) != (self.private_key is None):
            raise ValueError("TLS client certificate and key must be given together")

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        """Read PEM files; raises ValueError naming the file that cannot be read."""
        return cls(_read(ca, "CA"), _read(cert, "cert"), _read(key, "key"), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_ca,
            private_key=self.private_key,
            certificate_chain=self.cert_chain,
        )


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read TLS {what} file {path}: {exc.strerror}") from None


def channel_options(
    tls: TlsConfig | None, keepalive: float | None = None
) -> list[tuple[str, int | str]]:
    """`keepalive` seconds: ping the server that often while calls are active and count it
    dead (UNAVAILABLE) when a ping goes unanswered as long; finds a peer that vanished without
    closing its connection (node loss, partition, a stopped process)."""
    options = list(_CHANNEL_OPTIONS)
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    if keepalive is not None:
        if not keepalive > 0:
            raise ValueError(f"keepalive must be > 0 seconds, got {keepalive}")
        ms = max(1, int(keepalive * 1000))
        options += [
            ("grpc.keepalive_time_ms", ms),
            ("grpc.keepalive_timeout_ms", ms),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            # else a silent peer (no data coming back) is pinged only every 5 minutes
            ("grpc.http2.min_time_between_pings_ms", ms),
            ("grpc.http2.ping_timeout_ms", ms),  # newer gRPC cores time pings out by this
        ]
    return options


def address_list(address: str | Sequence[str]) -> list[str]:
    """One gRPC target (a replica, or a name that load-balances) or several replicas. A
    plain "host:port,host:port" string is split; targets with a scheme (dns:///, ipv4:...,
    unix:) are gRPC's own and kept whole."""
    if isinstance(address, str):
        plain = "://" not in address and not address.startswith(("ipv4:", "ipv6:", "unix:"))
        items = address.split(",") if plain else [address]
    else:
        items = list(address)
    items = [a.strip() for a in items if a.strip()]
    if not items:
        raise ValueError("address: give at least one host:port")
    return items


def sync_channel(
    address: str, tls: TlsConfig | None, keepalive: float | None = None
) -> grpc.Channel:
    options = channel_options(tls, keepalive)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options)


def aio_channel(
    address: str, tls: TlsConfig | None, keepalive: float | None = None
) -> grpc.aio.Channel:
    options = channel_options(tls, keepalive)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), options=options)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Bearer token as call metadata. Sent per call (not call credentials) so it also works
    on plaintext channels, e.g. behind a TLS-terminating proxy."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def resolve_timeout(per_call: float | None, default: float | None) -> float | None:
    """Per-call timeout if given, else the client's default; math.inf means no deadline."""
    timeout = default if per_call is None else per_call
    if timeout is None or math.isinf(timeout):
        return None
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    return float(timeout)
