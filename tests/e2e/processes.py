"""Ending the real server processes the e2e tests start."""

from __future__ import annotations

import signal
import subprocess


def stop_gracefully(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, and the server must drain and exit 0 in time."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=timeout) == 0


def reap(proc: subprocess.Popen) -> None:
    """Kills a server a failed test left running (use in `finally`)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
