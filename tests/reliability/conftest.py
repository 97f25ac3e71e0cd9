"""Fixtures: one in-process server over the tiny zoo, shared by the reliability tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.server.harness import ServerThread, make_settings


@pytest.fixture(scope="module")
def server(model_repo: Path) -> Iterator[ServerThread]:
    # small limits keep generated requests cheap; max_streams leaves room for the storm test
    srv = ServerThread(
        make_settings(model_repo, max_tokens=4096, max_streams=2048, max_horizon=64)
    ).start()
    yield srv
    srv.stop()
