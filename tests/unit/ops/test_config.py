"""Every rnn-server setting is a documented flag and an RNNSERVE_* environment variable."""

from __future__ import annotations

import logging
import re
from dataclasses import fields

import pytest

from rnnserve.server.settings import Settings, build_parser, settings_from_args

OPS_VALUES = {
    "tokens_file": "/etc/rnnserve/tokens",
    "admin_tokens_file": "/etc/rnnserve/admin-tokens",
    "max_download_bytes": "0",
    "tls_cert": "/certs/server.pem",
    "tls_key": "/certs/server.key",
    "tls_client_ca": "/certs/ca.pem",
    "workers": "3",
    "poll_interval": "2.5",
    "auth_health": "1",
}


def test_help_documents_every_field_with_its_env_var() -> None:
    text = " ".join(build_parser().format_help().split())
    for f in fields(Settings):
        # whole names: --state-key-previous alone must not count as documenting --state-key
        flag, env = "--" + f.name.replace("_", "-"), "RNNSERVE_" + f.name.upper()
        assert re.search(re.escape(flag) + r"(?![\w-])", text), flag
        assert re.search(re.escape(env) + r"(?!\w)", text), env


def test_ops_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in OPS_VALUES.items():
        monkeypatch.setenv("RNNSERVE_" + name.upper(), value)
    s = settings_from_args([])
    assert s.tokens_file == OPS_VALUES["tokens_file"]
    assert s.admin_tokens_file == OPS_VALUES["admin_tokens_file"]
    assert s.max_download_bytes == 0  # no cap
    assert Settings().max_download_bytes == 2 * 1024**3
    assert s.tls_client_ca == OPS_VALUES["tls_client_ca"]
    assert (s.workers, s.poll_interval, s.auth_health) == (3, 2.5, 1)
    flagged = settings_from_args(["--workers", "2", "--poll-interval", "0"])
    assert (flagged.workers, flagged.poll_interval) == (2, 0.0)  # a flag beats the env


def test_a_bad_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The user set RNNSERVE_GRACE, never typed --grace: the error says where it came from."""
    monkeypatch.setenv("RNNSERVE_GRACE", "abc")
    with pytest.raises(SystemExit) as exit_:
        settings_from_args([])
    assert exit_.value.code == 2
    assert "cannot read 'abc' as float (from RNNSERVE_GRACE)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        settings_from_args(["--grace", "xyz"])  # typed: no variable named
    err = capsys.readouterr().err
    assert "cannot read 'xyz' as float" in err and "RNNSERVE_GRACE" not in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--workers", "0"], "--workers"),
        (["--poll-interval", "-1"], "--poll-interval"),
        (["--workers", "two"], "--workers"),
        (["--max-download-bytes", "-1"], "--max-download-bytes"),
    ],
)
def test_bad_ops_values_are_usage_errors(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        settings_from_args(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("endpoint", ["otel-collector:4317", "grpc://otel-collector:4317"])
def test_otlp_endpoint_without_http_or_https_is_a_usage_error(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Schemeless, the exporter would speak TLS to a plaintext collector and every span
    would be lost with no more than an exporter warning: refuse it at start instead."""
    monkeypatch.setenv("RNNSERVE_OTLP_ENDPOINT", endpoint)
    with pytest.raises(SystemExit) as info:
        settings_from_args([])
    assert info.value.code == 2
    assert "--otlp-endpoint must start with http://" in capsys.readouterr().err


def test_otlp_endpoint_with_a_scheme_is_accepted() -> None:
    for endpoint in ("http://otel-collector:4317", "HTTPS://otel-collector:4317", ""):
        assert settings_from_args(["--otlp-endpoint", endpoint]).otlp_endpoint == endpoint


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--decode-process", "4"], "--decode-process must be 0 or 1"),  # not "4 processes"
        (["--auth-health", "2"], "--auth-health must be 0 or 1"),
        (["--allow-empty-repo", "-1"], "--allow-empty-repo must be 0 or 1"),
        (["--reuse-port", "2"], "--reuse-port must be 0 or 1"),
        (["--http-port", "70000"], "--http-port must be in 0..65535"),
        (["--metrics-port", "-1"], "--metrics-port must be in 0..65535"),
        (["--state-key", " \n"], "--state-key is only whitespace"),
    ],
)
def test_switches_ports_and_keys_are_checked_by_name(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A switch took any integer silently (-1 and 2 meant on); a bad port did not say which
    of the three flags it was; a blank --state-key silently signed with a random key."""
    with pytest.raises(SystemExit) as info:
        settings_from_args(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_blank_provider_names_are_dropped() -> None:
    assert settings_from_args(["--providers", " , CUDA ,cpu,"]).providers == ["cuda", "cpu"]


def test_state_key_is_stripped_like_the_previous_keys() -> None:
    """RNNSERVE_STATE_KEY from a secret file ends in a newline. --state-key-previous was
    stripped and --state-key was not, so after `--state-key NEW --state-key-previous OLD\\n`
    no token signed with `OLD\\n` verified, and a replica given OLD as a flag refused them."""
    from rnnserve.server.main import state_signer

    old = state_signer(Settings(state_key="old-key\n"))
    assert old.kid == state_signer(Settings(state_key="old-key")).kid
    rotated = state_signer(Settings(state_key="new-key\n", state_key_previous="old-key\n"))
    assert rotated.kid == state_signer(Settings(state_key="new-key")).kid
    assert old.kid in rotated._by_id


def test_tokens_signed_before_keys_were_stripped_still_verify() -> None:
    """Servers before the strip signed with RNNSERVE_STATE_KEY as given, newline and all: an
    upgraded replica refused their tokens (failover during the rolling update, saved resume
    files), and no flag could accept them (--state-key-previous is stripped too)."""
    import numpy as np

    from rnnserve.artifact.manifest import StateSpec
    from rnnserve.server.main import state_signer
    from rnnserve.server.resume import StateSigner

    specs = [StateSpec("h", "h_in", "h_out", [-1, 2], 0)]
    before = StateSigner("old-key\n").sign("m", "1", [np.zeros((1, 2), np.float32)], 3)
    upgraded = state_signer(Settings(state_key="old-key\n"))
    assert upgraded.key == b"old-key"  # it signs as every upgraded replica does
    assert upgraded.verify(before, "m", "1", specs, 10).last_token == 3
    rotated = state_signer(Settings(state_key="new-key", state_key_previous="old-key\n"))
    assert rotated.verify(before, "m", "1", specs, 10).last_token == 3


def test_a_short_state_key_is_warned_about_at_start(caplog) -> None:
    """Any resume token lets its holder test guesses of the key offline: a short one is
    said at start (not refused: a deployment's existing key keeps working)."""
    from rnnserve.server.main import state_signer

    with caplog.at_level(logging.WARNING, logger="server"):
        state_signer(Settings(state_key="k" * 15 + "\n"))
    assert "--state-key is 15 bytes" in caplog.text and "openssl rand -hex 32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server"):
        state_signer(Settings(state_key="0123456789abcdef"))
        state_signer(Settings())  # no key: a random one per process, nothing to warn about
    assert "--state-key" not in caplog.text
