"""TLS and mutual TLS against a fake server with throw-away certificates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rnnserve.client import NO_RETRY, RnnClient, TlsConfig, Unavailable
from rnnserve.client.cli import main
from tests.unit.client import fake_server
from tests.unit.client.certs import make_pki


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    ca, server, client = make_pki()
    creds = grpc.ssl_server_credentials(
        [(server.key, server.cert)], root_certificates=ca.cert, require_client_auth=True
    )
    srv, _rec, port = fake_server.start(creds)
    d = tmp_path_factory.mktemp("pki")
    for name, data in {
        "ca.pem": ca.cert,
        "client.pem": client.cert,
        "client.key": client.key,
    }.items():
        (d / name).write_bytes(data)
    yield f"localhost:{port}", d
    srv.stop(grace=None)


def test_mtls_with_client_certificate_works(mtls_server) -> None:
    address, d = mtls_server
    tls = TlsConfig.from_files(d / "ca.pem", d / "client.pem", d / "client.key")
    with RnnClient(address, tls=tls, timeout=10) as c:
        assert [m.name for m in c.list_models()] == ["lstm", "sine-gru"]


def test_mtls_without_client_certificate_is_refused(mtls_server) -> None:
    address, d = mtls_server
    tls = TlsConfig.from_files(d / "ca.pem")
    with RnnClient(address, tls=tls, timeout=10, retry=NO_RETRY) as c, pytest.raises(Unavailable):
        c.list_models()


def test_cli_tls_flags(mtls_server, capsys) -> None:
    address, d = mtls_server
    argv = ["--address", address, "--tls-ca", str(d / "ca.pem")]
    argv += ["--tls-cert", str(d / "client.pem"), "--tls-key", str(d / "client.key"), "models"]
    assert main(argv) == 0
    assert "sine-gru" in capsys.readouterr().out


def test_cert_without_key_is_a_clear_error(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="together"):
        TlsConfig(cert_chain=b"x")
    assert main(["--tls-cert", str(tmp_path / "c.pem"), "models"]) == 64
    assert "error:" in capsys.readouterr().err


def test_missing_ca_file_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["--tls-ca", str(tmp_path / "nope.pem"), "models"]) == 64
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read TLS CA file")


def test_tls_server_name_alone_implies_tls(monkeypatch) -> None:
    """Like --tls-ca, --tls-cert and --tls-key: not silently ignored over plaintext."""
    from rnnserve.client import cli

    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "RnnClient", lambda address, **kw: seen.update(kw))
    cli.make_client(cli.build_parser().parse_args(["--tls-server-name", "rnnserve", "models"]))
    assert seen["tls"] == TlsConfig(server_name="rnnserve")
    cli.make_client(cli.build_parser().parse_args(["models"]))
    assert seen["tls"] is None


@pytest.mark.parametrize(
    ("flag", "given", "says"),
    [
        ("--tls-ca", "client.key", "TLS CA file {d}/client.key holds no PEM certificate"),
        ("--tls-cert", "client.key", "TLS cert file {d}/client.key holds no PEM certificate"),
        ("--tls-key", "client.pem", "TLS key file {d}/client.pem holds no PEM private key"),
        ("--tls-ca", "junk.txt", "TLS CA file {d}/junk.txt holds no PEM certificate"),
    ],
)
def test_a_tls_file_of_the_wrong_kind_is_bad_usage_naming_it(
    mtls_server, capsys, flag, given, says
):
    """A key given as the CA (or cert and key swapped) was taken by gRPC and failed only when
    it dialled: exit 14 UNAVAILABLE "server down" after the retries, the error naming some
    address's "Connection refused", C-core log lines around it."""
    address, d = mtls_server
    (d / "junk.txt").write_text("not a certificate\n")
    files = {
        "--tls-ca": "ca.pem",
        "--tls-cert": "client.pem",
        "--tls-key": "client.key",
        flag: given,
    }
    argv = ["--address", address, "--timeout", "5"]
    for option, name in files.items():
        argv += [option, str(d / name)]
    assert main([*argv, "models"]) == 64
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: " + says.format(d=d))


def test_tls_config_refuses_bytes_that_are_not_pem(mtls_server) -> None:
    _address, d = mtls_server
    cert, key = (d / "client.pem").read_bytes(), (d / "client.key").read_bytes()
    with pytest.raises(ValueError, match=r"TlsConfig.root_ca holds no PEM certificate"):
        TlsConfig(root_ca=key)
    with pytest.raises(ValueError, match=r"TlsConfig.private_key holds no PEM private key"):
        TlsConfig(cert_chain=cert, private_key=cert)
    TlsConfig(root_ca=(d / "ca.pem").read_bytes(), cert_chain=cert, private_key=key)  # fine
