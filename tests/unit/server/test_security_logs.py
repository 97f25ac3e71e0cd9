"""What the JSON log lines may not carry: a bearer token quoted by a parser's error."""

from __future__ import annotations

import json
import logging
import sys

from rnnserve.server.logs import JsonFormatter

TOKEN = "tok-7c1e9a44d2"
# what aiohttp's parser says of a header line holding a control character, as the HTTP
# port's ServerLog logs it (server/http/app.py)
MALFORMED = (
    "Error handling request from 127.0.0.1 (a malformed request, answered 400): Invalid "
    f"header value char: b'Authorization: Bearer {TOKEN}\\x01' ^"
)


def _line(msg: str, **kwargs) -> dict:
    record = logging.LogRecord("aiohttp.server", logging.INFO, __file__, 1, msg, None, None)
    for key, value in kwargs.items():
        setattr(record, key, value)
    return json.loads(JsonFormatter().format(record))


def test_a_token_quoted_by_a_malformed_header_error_is_not_logged() -> None:
    entry = _line(MALFORMED)
    assert TOKEN not in json.dumps(entry)
    assert entry["msg"].endswith("b'Authorization: <redacted>' ^"), entry["msg"]


def test_a_token_in_an_extra_field_or_a_traceback_is_not_logged() -> None:
    try:
        raise ValueError(f"bad header 'authorization:{TOKEN}'")
    except ValueError:
        exc_info = sys.exc_info()
    entry = _line("failed", error=f"AUTHORIZATION: Basic {TOKEN}", exc_info=exc_info)
    assert TOKEN not in json.dumps(entry)
    assert entry["error"] == "AUTHORIZATION: <redacted>"


def test_the_auth_hint_and_other_lines_are_left_as_they_are() -> None:
    hint = "missing 'authorization: Bearer <token>' metadata"
    entry = _line("openai.Models UNAUTHENTICATED", error=hint, rpc="openai.Models")
    assert entry["error"] == hint and entry["msg"] == "openai.Models UNAUTHENTICATED"


def test_a_bearer_value_quoted_without_its_header_name_is_not_logged() -> None:
    """aiohttp's error for a header over 8190 bytes quotes the start of the value alone."""
    msg = "Got more than 8190 bytes (10007) when reading Header value is too long."
    msg += f" b'Bearer {TOKEN}S8S8'"
    entry = _line(msg)
    assert TOKEN not in json.dumps(entry)
    assert entry["msg"].endswith("b'Bearer <redacted>'"), entry["msg"]
    prose = _line("openai.Models UNAUTHENTICATED", error="invalid bearer token")
    assert prose["error"] == "invalid bearer token"
