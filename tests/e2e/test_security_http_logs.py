"""A real rnn-server's log never holds a bearer token, not even one a malformed HTTP request
carried (aiohttp quotes the header line it cannot parse in the error it logs)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.e2e.served import free_port, rnn_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TOKEN = "tok-e2e-5b0d7f31c8"


def _raw_request(port: int, header_value: bytes) -> bytes:
    """One GET with `header_value` as its Authorization header; the reply's status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(
            b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Authorization: " + header_value + b"\r\n\r\n"
        )
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


def test_a_token_in_a_malformed_header_stays_out_of_the_log(
    model_repo: Path, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    env = {"RNNSERVE_TOKENS": TOKEN, "RNNSERVE_HTTP_PORT": str(port)}
    with rnn_server(model_repo, log, env=env):
        assert b" 200 " in _raw_request(port, f"Bearer {TOKEN}".encode())
        assert b" 400 " in _raw_request(port, f"Bearer {TOKEN}\x01".encode())
    text = log.read_text()
    assert "a malformed request, answered 400" in text, text[-3000:]
    assert TOKEN not in text
