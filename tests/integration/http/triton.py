"""Where the real tritonclient runs: its own venv (tritonclient[grpc] pins protobuf < 7, the
server's grpcio-health-checking needs >= 7.35), made by `make triton-venv`.
RNNSERVE_TRITON_PYTHON points elsewhere, e.g. at .venv/bin/python once one environment can
hold both."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

VENV_PYTHON = REPO_ROOT / ".venv" / "triton-client" / "bin" / "python"
SCRIPT = Path(__file__).with_name("triton_calls.py")


def triton_python() -> str:
    python = os.environ.get("RNNSERVE_TRITON_PYTHON") or str(VENV_PYTHON)
    if not Path(python).exists():
        pytest.fail(f"no tritonclient environment at {python}: run `make triton-venv`")
    return python


def run_triton(transport: str, address: str, token: str = "", refusals: bool = False) -> dict:
    """triton_calls.py's answers; `refusals`: those of the unserved Triton extensions."""
    args = [triton_python(), str(SCRIPT), transport, address, *([token] if token else [])]
    args += ["--refusals"] if refusals else []
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
