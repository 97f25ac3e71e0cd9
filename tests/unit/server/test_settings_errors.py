"""Flags and RNNSERVE_* environment variables; domain errors map to their status codes."""

from __future__ import annotations

import grpc
import pytest

from rnnserve.server.errors import BadRequest, Overloaded, UnknownModel, UnsupportedTask, status_for
from rnnserve.server.settings import build_parser, settings_from_args


def test_flags_override_environment_which_overrides_defaults(monkeypatch) -> None:
    monkeypatch.setenv("RNNSERVE_MAX_STREAMS", "7")
    monkeypatch.setenv("RNNSERVE_PROVIDERS", "cuda,cpu")
    s = settings_from_args(["--max-batch", "3"])
    assert (s.max_streams, s.max_batch, s.providers) == (7, 3, ["cuda", "cpu"])
    assert settings_from_args(["--max-streams", "9"]).max_streams == 9


def test_help_documents_every_flag_with_its_env_var() -> None:
    text = build_parser().format_help()
    for flag in ("--max-streams", "--state-key", "--grace", "--metrics-port", "--providers"):
        assert flag in text
    assert "RNNSERVE_MAX_PROMPT_TOKENS" in text


@pytest.mark.parametrize(
    "argv",
    [["--max-batch", "0"], ["--port", "x"], ["--log-level", "loud"],
     ["--max-message-bytes", "3000000000"], ["--drain-delay", "inf"], ["--grace", "nan"],
     ["--poll-interval", "-1"], ["--state-max-age", "-1"], ["--state-max-age", "inf"],
     ["--state-max-age", "nan"], ["--state-max-age", "1h"]],
)  # fmt: skip
def test_bad_settings_exit_with_usage_error(argv, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        settings_from_args(argv)
    assert err.value.code == 2
    assert "error" in capsys.readouterr().err


def test_state_max_age_defaults_to_never_and_reads_the_environment(monkeypatch) -> None:
    assert settings_from_args([]).state_max_age == 0
    monkeypatch.setenv("RNNSERVE_STATE_MAX_AGE", "86400")
    assert settings_from_args([]).state_max_age == 86400
    assert settings_from_args(["--state-max-age", "1.5"]).state_max_age == 1.5


def test_a_state_max_age_under_a_second_is_refused(capsys) -> None:
    """Tokens record when they were made in whole seconds: with 0.5 a token 0.1 s old was
    refused as expired ("expired at ...:40Z (made ...:40Z)")."""
    with pytest.raises(SystemExit):
        settings_from_args(["--state-max-age", "0.5"])
    assert "or at least 1 (tokens record whole seconds)" in capsys.readouterr().err


def test_a_bad_state_max_age_says_what_is_expected(capsys) -> None:
    with pytest.raises(SystemExit):
        settings_from_args(["--state-max-age", "-5"])
    assert "--state-max-age must be a finite number of seconds" in capsys.readouterr().err


@pytest.mark.parametrize(
    "exc, code",
    [
        (BadRequest("prompt", "empty"), grpc.StatusCode.INVALID_ARGUMENT),
        (UnknownModel("x"), grpc.StatusCode.NOT_FOUND),
        (UnsupportedTask("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(exc, code) -> None:
    got, message = status_for(exc)
    assert got == code
    assert "secret detail" not in message


def test_an_absurd_number_of_workers_is_refused(capsys) -> None:
    """--workers 2000 started 2000 processes that each loaded every model (load ~700)."""
    with pytest.raises(SystemExit):
        settings_from_args(["--workers", "2000"])
    assert "--workers must be at most 256" in capsys.readouterr().err
    assert settings_from_args(["--workers", "4"]).workers == 4
