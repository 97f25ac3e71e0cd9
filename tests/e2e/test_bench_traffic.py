"""bench/traffic.py end to end on the tiny zoo lstm: a real server, every section in the JSON.

A smoke run (about 15 s): it proves the benchmark runs and its numbers are sane, not that the
server is fast.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench import traffic

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_traffic_quick_run_writes_every_section(model_repo: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "traffic.py"), "--quick", "--model-repo",
           str(model_repo), "--models", "lstm", "--out", str(tmp_path), "--levels", "1,4",
           "--rates", "1x", "--duration", "1", "--warmup", "0.3", "--client-cpu", "-1",
           "--markdown"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| fixed | 4 |" in done.stdout and "| target |" in done.stdout
    assert (tmp_path / "traffic.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "traffic.json").read_text())
    assert {"config", "server", "machine", "client", "models", "wall_s"} <= results.keys()
    res = results["models"]["lstm"]
    ceiling = res["ceiling"]
    assert 0 < ceiling["single"]["step_p50_s"] < ceiling["single"]["prefill_p50_s"] < 0.1
    assert [r["batch"] for r in ceiling["static"]] == [1, 4]
    steps = {r["batch"]: r for r in ceiling["steps_only"]}  # the two-thread bound
    assert all(steps[b]["tokens_per_s"] > 0 for b in (1, 4))
    two = {r["clients"]: r["vs_two_thread"] for r in res["closed_loop"]["fixed"]}
    assert two[4] == pytest.approx(
        res["closed_loop"]["fixed"][1]["tokens_per_s"] / steps[4]["tokens_per_s"]
    )
    assert all(r["tokens_per_s"] > 0 for w in ceiling["churn"].values() for r in w)
    # the target ceilings: measured before and after the server rows, ratios on their mean
    before, after = res["ceiling_passes"]
    assert ceiling["static"][1]["tokens_per_s"] == pytest.approx(
        (before["static"][1]["tokens_per_s"] + after["static"][1]["tokens_per_s"]) / 2
    )
    assert [r["batch"] for r in after["steps_only"]] == [1, 4]
    tpot = next(t for t in res["targets"] if t["name"].startswith("TPOT p50 C=1"))
    assert tpot["ratio"] == pytest.approx(
        res["closed_loop"]["fixed"][0]["tpot_p50_s"] / ceiling["single"]["step_p50_s"]
    )
    assert len(tpot["ratio_per_pass"]) == 2 and min(tpot["ratio_per_pass"]) > 0
    assert "before / after the server rows" in done.stdout
    in_step = ceiling["prompt_in_step"]
    assert [r["slots"] for r in in_step["fixed"]] == [4]
    assert all(r["tokens_per_s"] > 0 and r["ttft_p50_s"] > 0 for w in in_step.values() for r in w)
    for name in ("fixed", "mixed"):
        rows = res["closed_loop"][name]
        assert [r["clients"] for r in rows] == [1, 4]
        for r in rows:
            assert r["errors"] == {} and r["tokens_per_s"] > 0 and r["requests_per_s"] > 0
            assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] < 5
            # 0 when one message carried every token: a client sees messages, not steps
            assert 0 <= r["tpot_p50_s"] <= r["tpot_p99_s"] < 1
            assert r["vs_bare_churn"] > 0 and r["client_cpu_s"] > 0
    assert res["closed_loop"]["fixed"][0]["mean_output_tokens"] == 64
    (row,) = res["open_loop"]["rows"]
    assert row["rate"] == pytest.approx(res["open_loop"]["base_rps"])
    assert row["error_count"] == 0 and row["tokens_per_s"] > 0 and row["sent"] > 0
    assert 0 <= row["goodput_share"] <= 1
    assert res["score"]["grpc_tokens_per_s"] > 0 and res["score"]["ratio"] > 0
    # the fixed closed loop again on each variant's server
    assert res["variants"].keys() == {"decode_process", "workers_2"}
    for rows in res["variants"].values():
        assert [r["clients"] for r in rows] == [1, 4]
        assert all(r["errors"] == {} and r["tokens_per_s"] > 0 for r in rows)
    assert "`--decode-process 1`" in done.stdout and "`--workers 2`" in done.stdout
    (engine,) = res["engine"]  # the engine without gRPC: C=1 of the levels run
    assert engine["clients"] == 1 and engine["tokens_per_s"] > 0
    assert 0 < engine["ttft_p50_s"] < 1 and engine["ttft_p50_vs_bare_prefill"] > 0
    assert 0 < res["transport_floor_s"] < 1 and "engine alone" in done.stdout
    names = [t["name"] for t in res["targets"]]
    assert len(names) == 8 and any("Score" in n for n in names)
    measured = {t["name"]: t for t in res["targets"] if t["met"] is not None}
    assert len(measured) == 3  # C=1 TTFT and TPOT, Score; the C>=32 ones need those levels
    assert all(math.isfinite(t["ratio"]) for t in measured.values())


def test_workloads_are_real_text_of_the_documented_shape() -> None:
    text = "the time traveller for so it will be convenient to speak of him " * 200
    fixed = traffic.fixed_workload(text, n=64)
    assert {len(p) for p, _ in fixed.requests} == {16} and {n for _, n in fixed.requests} == {64}
    assert all(p in text for p, _ in fixed.requests)
    mixed = traffic.mixed_workload(text, n=2000)
    plen = [len(p) for p, _ in mixed.requests]
    outs = [n for _, n in mixed.requests]
    assert min(plen) >= 8 and max(plen) <= 256 and min(outs) >= 16 and max(outs) <= 512
    assert np.median(outs) == pytest.approx(math.sqrt(16 * 512), rel=0.15)  # log-uniform
    assert traffic.mixed_workload(text, n=50).requests == traffic.mixed_workload(text, 50).requests


def test_latency_definitions() -> None:
    assert traffic.tpot_of(1.0, 1.63, 64) == pytest.approx(0.01)
    assert traffic.tpot_of(1.0, 1.0, 1) is None
    assert traffic.within_slo(0.05, 0.005) and not traffic.within_slo(0.051, 0.001)
    assert not traffic.within_slo(0.01, 0.006) and not traffic.within_slo(None, None)
    assert traffic.parse_rates("0.5x,1x,300", 200.0) == [100.0, 200.0, 300.0]
    rows = [{"rate": r, "goodput_share": g} for r, g in ((1, 1.0), (2, 0.995), (3, 0.9), (4, 1))]
    assert traffic.max_good_rate(rows) == 2  # 4 meets it, but only past a rate that did not


def test_client_dropped_arrivals_count_against_goodput() -> None:
    # an open-loop arrival the client could not send (MAX_IN_FLIGHT) inside the window is a
    # request that missed the SLO, not one that never existed; outside the window it is neither
    tally = traffic.Tally(w0=10.0, w1=20.0, good=3, measured=3)
    tally.drop(15.0)
    tally.drop(5.0)
    row = traffic.summarize(tally, duration=10.0)
    assert tally.dropped == 2 and row["measured_requests"] == 4
    assert row["goodput_share"] == pytest.approx(0.75)


def test_open_loop_latency_counts_from_the_planned_arrival() -> None:
    """An arrival sent late (a busy client) must not hide its lag from TTFT: it counts from the
    planned time (coordinated omission), not from when the client got round to sending."""

    class Message:
        token_ids = (7,)

    class Stub:
        def Generate(self, request, timeout):
            async def stream():
                yield Message()

            return stream()

    tally = traffic.Tally(w0=0.0, w1=float("inf"))
    planned = time.perf_counter() - 0.5  # half a second late
    assert asyncio.run(traffic.one_request(Stub(), None, tally, scheduled=planned))
    assert tally.ttft[0] >= 0.5 and tally.measured == 1
