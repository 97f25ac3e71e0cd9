"""The Makefile's `venv` and `test` targets as a fresh machine runs them (`make -n`: the commands
are printed, not run), into a venv path that does not exist yet."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.tools import need
from tests.unit.deploy.deployfiles import REPO_ROOT


def _dry_run(target: str, venv: Path, **env: str) -> list[str]:
    make = need("make", "the Makefile's targets cannot be dry-run")
    # under `make test` the parent's MAKEFLAGS (its VENV=..., -n, -j) would reach this make
    dropped = {"RNNSERVE_TRITON_PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    environ = {k: v for k, v in os.environ.items() if k not in dropped} | env
    done = subprocess.run(
        [make, "-n", "-C", str(REPO_ROOT), target, f"VENV={venv}"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if not line.lstrip().startswith("#")]


def test_fresh_venv_takes_torch_from_the_cpu_index(tmp_path: Path) -> None:
    """PyPI's torch==2.13.0 is the CUDA build: without the CPU index a fresh `make run` or
    `make test` downloaded GBs of nvidia-* wheels (only a machine with a CPU wheel in pip's
    find-links got the CPU one)."""
    lines = _dry_run("venv", tmp_path / "venv")
    torch = [i for i, line in enumerate(lines) if "'torch==2.13.0'" in line]
    assert len(torch) == 1, lines
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch[0]]
    extras = [i for i, line in enumerate(lines) if "-e '.[" in line]
    assert extras and torch[0] < extras[0], "torch first, so the extras' pin finds it installed"


def test_fresh_make_test_builds_the_tritonclient_venv_the_kserve_tests_run(
    tmp_path: Path,
) -> None:
    """`make test` is the README's whole-suite command: on a fresh machine the tritonclient
    tests failed ("run `make triton-venv`") because only .ci/run made that venv."""
    venv = tmp_path / "venv"
    lines = _dry_run("test", venv)
    made = [i for i, line in enumerate(lines) if f"-m venv {venv}/triton-client" in line]
    pytest_line = [i for i, line in enumerate(lines) if "-m pytest" in line]
    assert made and pytest_line and made[0] < pytest_line[0], lines
    # the tests look for the venv the Makefile made, even under another VENV
    command = " ".join(lines[pytest_line[0] - 1 : pytest_line[0] + 1])
    assert f"{venv}/triton-client/bin/python" in command
    assert "RNNSERVE_TRITON_PYTHON=" in command


def test_make_test_uses_a_given_triton_interpreter_without_a_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    lines = _dry_run("test", venv, RNNSERVE_TRITON_PYTHON="/opt/other/bin/python")
    assert not any("triton-client" in line and "-m venv" in line for line in lines), lines
    assert any("-m pytest" in line for line in lines)
