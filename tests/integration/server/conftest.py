"""Fixtures: one in-process server over the tiny zoo (tests/conftest.py's model_repo)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.server.harness import ServerThread, make_settings


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[ServerThread]:
    # a high --max-tokens lets a test keep a stream alive long enough to cancel it
    srv = ServerThread(make_settings(model_repo, max_tokens=200_000)).start()
    yield srv
    srv.stop()


@pytest.fixture
def stub(server: ServerThread):
    return server.stub
