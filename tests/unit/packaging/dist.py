"""Builds the sdist and wheel the way a release would: `python -m build` (isolated backend)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

BUILD_TIMEOUT_S = 300  # fetching the isolated setuptools from the index counts too


@dataclass(frozen=True)
class BuiltDist:
    wheel: Path
    sdist: Path
    log: str  # everything the build printed, stdout and stderr


def build_dist(out: Path) -> BuiltDist:
    """sdist first, then the wheel from the unpacked sdist (so the sdist is proven complete)."""
    # PYTHONDONTWRITEBYTECODE makes setuptools warn that it skips byte-compiling: the
    # environment's choice, not the project's, so the build runs without it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT_S,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    (wheel,) = out.glob("rnnserve-*.whl")
    (sdist,) = out.glob("rnnserve-*.tar.gz")
    return BuiltDist(wheel=wheel, sdist=sdist, log=log)


@functools.cache
def shared_dist() -> BuiltDist:
    """One build per test process, shared by the packaging and the clean-install tests."""
    out = Path(tempfile.mkdtemp(prefix="rnnserve-dist-"))
    atexit.register(shutil.rmtree, out, True)
    return build_dist(out)
