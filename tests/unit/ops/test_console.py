"""`rnn-server` handles SIGTERM/SIGINT from its first line (server/console.py): a signal that
lands while the server's modules import (about a second) exits 0, where it used to end the
process with 143, or be dropped by the kernel where rnn-server is PID 1 (a container with
no init), which then served on until SIGKILL. A SIGHUP then does not kill it."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

# stands in for the import of rnnserve.server.main: the signal lands in the middle of it
SCRIPT = """
import importlib.abc, importlib.util, os, signal, sys, time

class Slow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "rnnserve.server.main":
            return importlib.util.spec_from_loader(name, self)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        time.sleep(0.5)  # the rest of the imports
        module.main = lambda: print("started") or 3

sys.meta_path.insert(0, Slow())
from rnnserve.server.console import main
sys.exit(main())
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_while_importing_exits_0(sig: str) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, sig], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "started" not in done.stdout and "Traceback" not in done.stderr


def test_a_sighup_while_importing_is_ignored() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, "SIGHUP"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 3 and "started" in done.stdout, (done.returncode, done.stderr)
    assert done.returncode != -signal.SIGHUP
