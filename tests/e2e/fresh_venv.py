"""Empty virtual environments (no system site-packages, no dev tools) that install the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

INSTALL_TIMEOUT_S = 900  # downloads from the package index count too


def clean_env() -> dict[str, str]:
    """This process's environment less anything that would leak the dev venv in."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def make_venv(path: Path) -> Path:
    """Creates an empty venv with the interpreter running the tests; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def pip_install(python: Path, *requirements: str) -> None:
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-compile", *requirements],  # byte-compiling torch alone takes a minute
        capture_output=True, text=True, env=clean_env(), timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def run_python(
    python: Path, code: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Runs `code` in the venv; the caller asserts on the result. `python -c` puts the cwd
    first on sys.path, so the default cwd is the venv's own folder, never the repository."""
    return subprocess.run(
        [str(python), "-c", code],
        capture_output=True, text=True, cwd=cwd or python.parent.parent, env=clean_env(),
        timeout=timeout,
    )  # fmt: skip


def importable(python: Path, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return run_python(python, code).returncode == 0
