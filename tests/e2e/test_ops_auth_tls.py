"""Real `rnn-server` processes with bearer-token auth, TLS and mutual TLS, called by `rnn-client`.

Certificates are generated on the fly with `cryptography` (a CA, a server cert for 127.0.0.1 /
localhost, a client cert, and an unrelated CA to show that an untrusted chain is refused).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.e2e.processes import reap, stop_gracefully

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
READY_WAIT_S = 60.0  # bound on start-up, not a speed assertion
CALL_TIMEOUT_S = 30.0

ChannelFactory = Callable[[str], grpc.Channel]


# -- certificates ---------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer_key, issuer: str, key, *, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> str:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM paths: ca, server cert/key, client cert/key, and a foreign CA + client pair."""
    d = tmp_path_factory.mktemp("pki")
    out: dict[str, str] = {}
    for prefix in ("", "other_"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert(f"{prefix}test-ca", ca_key, f"{prefix}test-ca", ca_key, ca=True)
        out[prefix + "ca"] = _write(d / f"{prefix}ca.pem", cert=ca)
        for role in ("server", "client"):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _cert(f"{prefix}{role}", ca_key, f"{prefix}test-ca", key, ca=False,
                         server=role == "server")  # fmt: skip
            out[f"{prefix}{role}_cert"] = _write(d / f"{prefix}{role}.pem", cert=cert)
            out[f"{prefix}{role}_key"] = _write(d / f"{prefix}{role}.key", key=key)
    return out


# -- server process -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(channel: grpc.Channel, metadata: tuple = ()) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2, metadata=metadata
        )
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def server(
    model_repo: Path,
    log: Path,
    args: list[str],
    env: dict[str, str],
    channel: ChannelFactory,
    metadata: tuple = (),
) -> Iterator[str]:
    """Starts rnn-server with `args`, waits for SERVING over `channel`, SIGTERMs it after."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(model_repo), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0", "--grace", "2", *args]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    try:
        end = time.monotonic() + READY_WAIT_S
        while True:
            with channel(address) as ch:
                if _serving(ch, metadata):
                    break
            if proc.poll() is not None:
                pytest.fail(f"rnn-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > end:
                pytest.fail(
                    f"rnn-server not SERVING in {READY_WAIT_S:g}s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield address
        stop_gracefully(proc)
    finally:
        reap(proc)


def client(address: str, *argv: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "rnn-client"), "--address", address, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)


# -- tests ----------------------------------------------------------------------------------
def test_bearer_tokens(model_repo: Path, tmp_path: Path) -> None:
    file_token, env_token = "file-tok-7f3a9c", "env-tok-51d2e8"
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# operators\n{file_token}\n\n")
    log = tmp_path / "server.log"
    env = {"RNNSERVE_TOKENS": env_token, "RNNSERVE_LOG_LEVEL": "DEBUG"}
    args = ["--tokens-file", str(tokens)]
    # health stays open without a token: the readiness wait below uses no token
    with server(model_repo, log, args, env, grpc.insecure_channel) as address:
        missing = client(address, "models")
        assert missing.returncode == 16, missing.stderr
        assert "UNAUTHENTICATED" in missing.stderr
        wrong = client(address, "--token", "not-a-token", "models")
        assert wrong.returncode == 16 and "UNAUTHENTICATED" in wrong.stderr
        ok = client(address, "--token", file_token, "models")
        assert ok.returncode == 0, ok.stderr
        assert "lstm" in ok.stdout
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            meta = (("authorization", f"Bearer {env_token}"), ("x-request-id", "auth-env-1"))
            msgs = list(
                stub.Generate(
                    pb.GenerateRequest(model="lstm", prompt="the", max_tokens=3),
                    metadata=meta,
                    timeout=CALL_TIMEOUT_S,
                )
            )
            assert msgs and msgs[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(
                    pb.GenerateRequest(model="lstm", prompt="the", max_tokens=3),
                    metadata=(("authorization", f"Basic {env_token}"),),
                    timeout=CALL_TIMEOUT_S,
                ).next()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    text = log.read_text()
    assert "UNAUTHENTICATED" in text and "auth-env-1" in text  # the calls were logged ...
    assert file_token not in text and env_token not in text  # ... without the tokens


def test_unreadable_tokens_file_is_a_clean_error(model_repo: Path, tmp_path: Path) -> None:
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(model_repo), "--port", "0",
           "--metrics-port", "0", "--tokens-file", str(tmp_path / "missing.txt")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
    assert done.returncode == 2
    assert "missing.txt" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "cert, key, client_ca, flag",
    [
        ("server_cert", "other_server_key", "", "--tls-key"),  # a key of another certificate
        ("server_key", "server_cert", "", "--tls-cert"),  # swapped
        ("server_cert", "server_key", "server_key", "--tls-client-ca"),  # a key, not a CA
    ],
)
def test_bad_tls_files_are_a_clean_error_naming_the_flag(
    model_repo: Path, pki: dict[str, str], cert: str, key: str, client_ca: str, flag: str
) -> None:
    """Exit 2 with the flag and file named, not grpc's "Failed to bind to address"."""
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(model_repo), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", "--http-port", "0",
           "--tls-cert", pki[cert], "--tls-key", pki[key]]  # fmt: skip
    if client_ca:
        cmd += ["--tls-client-ca", pki[client_ca]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
    assert done.returncode == 2, done.stderr[-2000:]
    assert flag in done.stderr and "Failed to bind" not in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_tls_and_mutual_tls(model_repo: Path, tmp_path: Path, pki: dict[str, str]) -> None:
    ca = Path(pki["ca"]).read_bytes()
    ccert, ckey = Path(pki["client_cert"]).read_bytes(), Path(pki["client_key"]).read_bytes()

    def tls_channel(address: str) -> grpc.Channel:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))

    def mtls_channel(address: str) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(ca, private_key=ckey, certificate_chain=ccert)
        return grpc.secure_channel(address, creds)

    tls_args = ["--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"]]
    with server(model_repo, tmp_path / "tls.log", tls_args, {}, tls_channel) as address:
        ok = client(address, "--tls-ca", pki["ca"], "models")
        assert ok.returncode == 0, ok.stderr
        assert "lstm" in ok.stdout
        plain = client(address, "models")  # plaintext against a TLS port
        assert plain.returncode != 0
        untrusted = client(address, "--tls-ca", pki["other_ca"], "models")
        assert untrusted.returncode != 0

    mtls_args = [*tls_args, "--tls-client-ca", pki["ca"]]
    with server(model_repo, tmp_path / "mtls.log", mtls_args, {}, mtls_channel) as address:
        ok = client(address, "--tls-ca", pki["ca"], "--tls-cert", pki["client_cert"],
                    "--tls-key", pki["client_key"], "models")  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert "lstm" in ok.stdout
        no_cert = client(address, "--tls-ca", pki["ca"], "models")
        assert no_cert.returncode != 0
        foreign = client(address, "--tls-ca", pki["ca"], "--tls-cert", pki["other_client_cert"],
                         "--tls-key", pki["other_client_key"], "models")  # fmt: skip
        assert foreign.returncode != 0


def test_auth_health_closes_health_and_reflection(model_repo: Path, tmp_path: Path) -> None:
    token = "health-tok-93b1"
    meta = (("authorization", f"Bearer {token}"),)
    env = {"RNNSERVE_TOKENS": token, "RNNSERVE_AUTH_HEALTH": "1"}
    log = tmp_path / "server.log"
    with (
        server(model_repo, log, [], env, grpc.insecure_channel, meta) as address,
        grpc.insecure_channel(address) as ch,
    ):
        health = health_pb2_grpc.HealthStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = health.Check(health_pb2.HealthCheckRequest(service="lstm"), timeout=10,
                          metadata=meta)  # fmt: skip
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(refl.ServerReflectionInfo(iter([ask]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = list(refl.ServerReflectionInfo(iter([ask]), timeout=10, metadata=meta))
        names = {s.name for s in listed[0].list_services_response.service}
        assert "rnnserve.v1.Inference" in names
    assert token not in log.read_text()


def test_admin_tokens_keep_reloads_to_operators(model_repo: Path, tmp_path: Path) -> None:
    """Any inference token could rescan and unload models. With admin tokens, `rnn-client
    --token <admin token> reload` rescans; an inference token there is PERMISSION_DENIED
    (exit 7), and the admin token still calls inference."""
    user, root, root_env = "user-tok-4c8e", "admin-tok-b7d1", "admin-env-tok-e02f"
    tokens, admin = tmp_path / "tokens.txt", tmp_path / "admin-tokens.txt"
    tokens.write_text(f"{user}\n")
    admin.write_text(f"# operators\n{root}\n")
    log = tmp_path / "server.log"
    args = ["--tokens-file", str(tokens), "--admin-tokens-file", str(admin)]
    env = {"RNNSERVE_ADMIN_TOKENS": root_env}
    with server(model_repo, log, args, env, grpc.insecure_channel) as address:
        refused = client(address, "--token", user, "reload")
        assert refused.returncode == 7, refused.stderr
        assert "PERMISSION_DENIED" in refused.stderr
        unknown = client(address, "--token", "not-a-token", "reload")
        assert unknown.returncode == 16, unknown.stderr
        for token in (root, root_env):
            reloaded = client(address, "--token", token, "reload")
            assert reloaded.returncode == 0, reloaded.stderr
        assert client(address, "--token", root, "models").returncode == 0
        assert client(address, "--token", user, "models").returncode == 0
    text = log.read_text()
    assert "PERMISSION_DENIED" in text and "--admin-tokens-file" not in text  # no warning
    assert all(t not in text for t in (user, root, root_env))
