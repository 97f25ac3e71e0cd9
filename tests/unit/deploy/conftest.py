"""Fixtures for the deploy checks: the server's real flags, parsed once from `rnn-server --help`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.deploy.deployfiles import REPO_ROOT


@dataclass(frozen=True)
class ServerFlags:
    """What `rnn-server --help` documents: flag names and their RNNSERVE_* variables."""

    flags: frozenset[str]  # "--model-repo", ...
    env: frozenset[str]  # "RNNSERVE_MODEL_REPO", ...


def _help_text() -> str:
    script = Path(sys.executable).with_name("rnn-server")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "rnnserve.server.main"]
    if not script.exists() and shutil.which("rnn-server"):
        cmd = ["rnn-server"]
    done = subprocess.run(
        [*cmd, "--help"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert done.returncode == 0, f"rnn-server --help failed: {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="session")
def server_flags() -> ServerFlags:
    text = _help_text()
    return ServerFlags(
        flags=frozenset(re.findall(r"(--[a-z][a-z0-9-]+)", text)) - {"--help"},
        env=frozenset(re.findall(r"\b(RNNSERVE_[A-Z0-9_]+)\b", text)),
    )


@pytest.fixture(scope="session")
def server_parser():
    """The real rnn-server argument parser (flags -> Settings), for checking argv in configs."""
    from rnnserve.server.settings import build_parser

    return build_parser()
