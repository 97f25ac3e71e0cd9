"""Connection settings shared by both clients: address, TLS, bearer token, default deadline.

Why: the sync and async clients build channels the same way; keeping it here means TLS/mTLS
and auth behave identically whichever one a caller picks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from rnnserve.client.retry import RetryPolicy

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT = 30.0  # seconds per call (per whole stream for Generate)

_INT_MAX = 2**31 - 1  # the largest channel option value gRPC accepts
_MIN_REDIAL_MS = 100  # the shortest pause between a channel's attempts to connect
_NO_DEADLINE_FROM = 1e9  # seconds (31 years): a timeout this long is no deadline

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
        for name in _PEM:
            _check_pem(getattr(self, name), name, f"TlsConfig.{name}")

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        """Read PEM files; raises ValueError naming the file that cannot be read or holds no
        PEM block of its kind (a key given as the CA, cert and key swapped)."""
        files = {"root_ca": (ca, "CA"), "cert_chain": (cert, "cert"), "private_key": (key, "key")}
        data = {name: _read(path, what) for name, (path, what) in files.items()}
        for name, (path, what) in files.items():
            _check_pem(data[name], name, f"TLS {what} file {path}")
        return cls(server_name=server_name, **data)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_ca,
            private_key=self.private_key,
            certificate_chain=self.cert_chain,
        )


# What each TlsConfig field must hold. gRPC takes anything and fails only when it dials:
# every call then ended UNAVAILABLE after its retries ("server down", exit 14), the cause
# buried in C-core log lines, the error naming some address's "Connection refused".
_CERT = ("certificate", "-----BEGIN CERTIFICATE-----", rb"-----BEGIN CERTIFICATE-----")
_KEY = ("private key", "-----BEGIN ... PRIVATE KEY-----", rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_PEM = {"root_ca": _CERT, "cert_chain": _CERT, "private_key": _KEY}


def _check_pem(data: bytes | None, name: str, source: str) -> None:
    """ValueError naming `source` when `data` (None: not given) has no PEM block of the kind
    field `name` needs."""
    kind, line, block = _PEM[name]
    if data is not None and not (isinstance(data, bytes) and re.search(block, data)):
        raise ValueError(f"{source} holds no PEM {kind} (no {line} line)")


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read TLS {what} file {path}: {exc.strerror}") from None


def channel_options(
    tls: TlsConfig | None, keepalive: float | None = None, retry: RetryPolicy | None = None
) -> list[tuple[str, int | str]]:
    """`keepalive` seconds: ping the server that often while calls are active and count it
    dead (UNAVAILABLE) when a ping goes unanswered as long; finds a peer that vanished without
    closing its connection (node loss, partition, a stopped process). `retry`: redial an
    unreachable server on its schedule (see `_reconnect_options`)."""
    options = list(_CHANNEL_OPTIONS)
    if retry is not None:
        options += _reconnect_options(retry)
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    if keepalive is not None:
        if not keepalive > 0:
            raise ValueError(f"keepalive must be > 0 seconds, got {keepalive}")
        # gRPC takes a C int of milliseconds: clamp (about 24.8 days, math.inf included)
        # rather than fail inside grpc with OverflowError
        ms = _ms(keepalive, 1)
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


def _reconnect_options(retry: RetryPolicy) -> list[tuple[str, int | str]]:
    """gRPC waits 1 s (growing to 120 s) before it redials an address it could not reach,
    and until then fails every call at once with the old error: the retries (0.1, 0.2, 0.4 s
    by default) all fell inside that wait, so a server back from a restart was never reached.
    Redial as often as the policy retries, but no sooner than every 100 ms (a policy that
    retries at once must not dial a dead server in a busy loop)."""
    first = _ms(retry.initial_backoff, _MIN_REDIAL_MS)
    return [
        ("grpc.initial_reconnect_backoff_ms", first),
        ("grpc.max_reconnect_backoff_ms", _ms(retry.max_backoff, first)),
    ]


def _ms(seconds: float, least: int) -> int:
    """Seconds as the C int of milliseconds a channel option takes, at least `least`."""
    return max(least, int(min(seconds * 1000, _INT_MAX)))


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
    for item in items:
        _check_port(item)
    return items


def _check_port(address: str) -> None:
    """gRPC keeps only the low 16 bits of a port (127.0.0.1:116087 dials 50551), so a port
    out of range would reach some other server: refuse it, naming the address."""
    if "://" in address or address.startswith(("ipv4:", "ipv6:", "unix:")):
        return  # gRPC's own target syntax
    if address.startswith("["):  # [v6]:port
        port = address.partition("]")[2].removeprefix(":")
    elif address.count(":") == 1:  # host:port (a bare v6 address has several colons)
        port = address.rpartition(":")[2]
    else:
        return
    if port.isdigit() and not 0 < int(port) <= 65535:
        raise ValueError(f"address: port {port} of {address} is not in 1..65535")


def sync_channel(
    address: str,
    tls: TlsConfig | None,
    keepalive: float | None = None,
    retry: RetryPolicy | None = None,
) -> grpc.Channel:
    options = channel_options(tls, keepalive, retry)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options)


def aio_channel(
    address: str,
    tls: TlsConfig | None,
    keepalive: float | None = None,
    retry: RetryPolicy | None = None,
) -> grpc.aio.Channel:
    options = channel_options(tls, keepalive, retry)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), options=options)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Bearer token as call metadata. Sent per call (not call credentials) so it also works
    on plaintext channels, e.g. behind a TLS-terminating proxy. Surrounding whitespace is
    dropped, as the server does for its tokens (a token file's trailing newline would make
    every call fail INTERNAL "Invalid metadata"); other characters a header cannot carry are
    refused here, naming the token rather than the call."""
    token = (token or "").strip()
    if not token:
        return ()
    if not all(" " <= ch <= "~" for ch in token):
        raise ValueError("token: a bearer token must be printable ASCII")
    return (("authorization", f"Bearer {token}"),)


def resolve_timeout(per_call: float | None, default: float | None) -> float | None:
    """Per-call timeout if given, else the client's default; math.inf means no deadline,
    and so does anything past `_NO_DEADLINE_FROM` (gRPC counts a deadline in int64
    nanoseconds: from about 9.2e9 s on it overflows and every call fails DEADLINE_EXCEEDED
    at once, the opposite of what such a timeout asks for)."""
    timeout = default if per_call is None else per_call
    if timeout is None or (timeout > 0 and timeout >= _NO_DEADLINE_FROM):
        return None
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    return float(timeout)
