"""An in-process server with the HTTP port on, over the tiny zoo; helpers for its clients."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.server.harness import ServerThread, make_settings

TOKEN = "http-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_server(model_repo: Path, **overrides) -> ServerThread:
    settings = make_settings(model_repo, http_port=free_port(), **overrides)
    return ServerThread(settings).start()


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[ServerThread]:
    # a high --max-tokens keeps a stream alive long enough to walk away from it
    srv = http_server(model_repo, max_tokens=200_000)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def base_url(server: ServerThread) -> str:
    assert server.app is not None and server.app.http is not None
    return f"http://127.0.0.1:{server.app.http.port}"
