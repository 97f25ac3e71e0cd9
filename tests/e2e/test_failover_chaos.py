"""Chaos with real processes: three `rnn-server` replicas sharing a --state-key, streams
(greedy and seeded-sampled) through RnnClient with all three addresses, a replica killed
with `kill -9` mid-stream, and a rolling restart (SIGTERM one at a time, --drain-delay) under
load. Every stream must complete with the text of the same request run without failure.

The driver is bench/failover.py (the benchmark runs more rounds and writes
bench/results/failover.json); here it runs a short, seeded version, in about 40 s.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import failover

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def replicas(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    repo = failover.model_repo(model_repo)
    logs = tmp_path_factory.mktemp("failover-logs")
    extra = ["--max-tokens", "2048", "--drain-delay", "0.3", "--grace", "2"]
    group = [failover.Replica(repo, logs, extra) for _ in range(3)]
    try:
        failover.start_all(group)
        yield group
    finally:
        for r in group:
            r.stop()
        shutil.rmtree(repo, ignore_errors=True)


@pytest.mark.timeout(240)
def test_kill_9_mid_stream_loses_no_stream(replicas) -> None:
    result = failover.chaos_rounds(replicas, rounds=2, streams=6, max_tokens=1200, seed=5)
    assert result["errors"] == [] and result["lost"] == 0, result
    assert result["streams"] == 12 and result["kills"] == 2
    assert result["resumed"] >= 1, result  # some streams were on the killed replicas


@pytest.mark.timeout(240)
def test_rolling_restart_under_load_loses_no_stream(replicas) -> None:
    result = failover.rolling_restart(replicas, max_tokens=600, seed=7, spawn_every=(0.05, 0.15))
    assert result["errors"] == [] and result["lost"] == 0, result
    assert result["exit_codes"] == [0, 0, 0]  # each replica drained and exited cleanly
    assert result["streams"] >= 20
