"""Fixtures for client unit tests: one fake server per module, its script reset per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.client import fake_server
from tests.unit.client.fake_server import Recorder, Script


@pytest.fixture(scope="module")
def _fake() -> Iterator[tuple[Recorder, str]]:
    server, rec, port = fake_server.start()
    yield rec, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def fake(_fake: tuple[Recorder, str]) -> Iterator[tuple[Recorder, str]]:
    rec, address = _fake
    rec.calls.clear()
    rec.metadata.clear()
    rec.requests.clear()
    rec.script = Script()
    yield rec, address
    if rec.script.hold is not None:
        rec.script.hold.set()
