"""The server and client never import torch: their images ship without it."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = [
    "rnnserve.server.main",
    "rnnserve.client.cli",
    "rnnserve.client",
    "rnnserve.artifact.manifest",
]


@pytest.mark.parametrize("module", MODULES)
def test_module_does_not_import_torch(module: str) -> None:
    code = (
        "import sys, importlib\n"
        f"importlib.import_module({module!r})\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
