"""External tools some tests run (promtool, prometheus, kubectl, node, curl, hadolint) and the
Python packages of the [dev] and [remote] extras some tests import: a missing one skips the test
on a developer's machine, and fails it in CI (CI=true), where `.ci/run` installs them, so a CI
image without them cannot turn those tests into silent skips."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """CI=true (or 1, yes): the suite must run every test, not skip one for a missing tool."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(message: str) -> NoReturn:
    """Skips the test (or the module, at import), or in CI fails it: a prerequisite the suite
    needs is absent."""
    if in_ci():
        pytest.fail(f"{message} (CI must have it)")
    pytest.skip(message, allow_module_level=True)


def need(tool: str, why: str, *, beside: Path | None = None) -> str:
    """The tool's path (first in `beside`, e.g. the venv's bin/, then on PATH); otherwise a
    skip, or in CI a failure."""
    if beside is not None and (beside / tool).exists():
        return str(beside / tool)
    path = shutil.which(tool)
    if path:
        return path
    missing(f"{tool} not installed: {why}")


def need_module(name: str, why: str) -> ModuleType:
    """The imported module; otherwise a skip, or in CI a failure (pytest.importorskip skips
    everywhere, and a broken install of an extra would pass CI unnoticed)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} cannot be imported ({exc}): {why}")


def has_ipv6_loopback() -> bool:
    """Whether this host can bind ::1 (a container without IPv6 cannot)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def http_status(url: str) -> int | None:
    """The HTTP status of a GET (an error status too), None when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None
