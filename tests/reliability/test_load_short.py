"""bench/load.py, short: a real rnn-server process under mixed load answers with no errors.

No timing assertions: only that every request succeeded and the report is complete.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
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


class _Message:
    def __init__(self, token_ids: tuple[int, ...]) -> None:
        self.token_ids = token_ids


class _OneStreamDone(Exception):
    """Ends generate_worker's loop after its first stream (it catches RpcError only)."""


class _Stub:
    """Generate: a message with no token first, a token 20 ms later; a second call ends the
    worker. A deadline 10 ms away ended it instead, and on a busy machine those 10 ms could
    pass before its first call: no stream ran at all."""

    def __init__(self) -> None:
        self.calls = 0

    def Generate(self, request, timeout):
        self.calls += 1
        if self.calls > 1:
            raise _OneStreamDone

        async def stream():
            yield _Message(())
            await asyncio.sleep(0.02)
            yield _Message((7,))

        return stream()


def test_percentiles_leave_out_the_warm_up_and_count_the_first_token() -> None:
    """Latency percentiles counted the cold start (every stream prefilling at once), and the
    first token was timed at the first message even when it carried none."""
    import grpc

    from bench import load
    from rnnserve.v1 import rnnserve_pb2 as pb

    warm = load.Tally(measure_from=time.monotonic() + 3600)  # all in the warm-up
    warm.record(time.monotonic(), 0.5, 0.1)
    row = warm.summary(1.0)
    assert row["ok"] == 1 and row["measured"] == 0 and row["p50_s"] is None

    t = load.Tally()
    with pytest.raises(_OneStreamDone):  # no deadline: the stub ends the worker
        asyncio.run(load.generate_worker(_Stub(), pb, grpc, "lstm", math.inf, 0, t))
    assert t.ok == 1 and len(t.first_token) == 1 and t.tokens == 1
    assert t.first_token[0] >= 0.02  # the token's message, not the empty one before it
