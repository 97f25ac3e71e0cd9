"""Every client module imports without torch (the client ships without it)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import rnnserve.client as client


def test_no_client_module_imports_torch() -> None:
    names = [f"rnnserve.client.{m.name}" for m in pkgutil.iter_modules(client.__path__)]
    assert "rnnserve.client.cli" in names and len(names) > 5
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "import rnnserve.client.forecast_plot as p, matplotlib\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
