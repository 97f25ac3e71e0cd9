"""bench/load.py, short: a real rnn-server process under mixed load answers with no errors.

No timing assertions: only that every request succeeded and the report is complete.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_short_load_has_no_errors(model_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "bench" / "load.py"), "--duration", "3", "--streams",
           "16", "--unary", "2", "--model-repo", str(model_repo), "--out", str(out),
           "--no-plot"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["errors"] == 0
    for kind in ("generate", "score", "forecast"):
        assert res[kind]["ok"] > 0 and res[kind]["errors"] == {}
    assert res["generate"]["tokens_per_s"] > 0
    assert res["rss_after_warmup_bytes"] and res["rss_end_bytes"]


def test_bad_flags_are_a_clear_error() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "load.py"), "--duration", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--duration" in proc.stderr and "Traceback" not in proc.stderr
