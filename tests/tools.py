"""External tools some tests run (promtool, prometheus, kubectl, node): a missing one skips
the test on a developer's machine, and fails it in CI (CI=true), where `.ci/run` installs them,
so a CI image without them cannot turn those tests into silent skips."""

from __future__ import annotations

import os
import shutil

import pytest


def need(tool: str, why: str) -> str:
    """The tool's path; otherwise a skip, or in CI a failure."""
    path = shutil.which(tool)
    if path:
        return path
    message = f"{tool} not installed: {why}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI must have it)")
    pytest.skip(message)
