"""One build per session for every packaging test."""

from __future__ import annotations

import pytest

from tests.unit.packaging.dist import BuiltDist, build_dist


@pytest.fixture(scope="session")
def built_dist(tmp_path_factory: pytest.TempPathFactory) -> BuiltDist:
    return build_dist(tmp_path_factory.mktemp("dist"))
