"""One build per session for every packaging test."""

from __future__ import annotations

import pytest

from tests.unit.packaging.dist import BuiltDist, shared_dist


@pytest.fixture(scope="session")
def built_dist() -> BuiltDist:
    return shared_dist()
