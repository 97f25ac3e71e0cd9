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
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

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
    # no order between them: on this tiny model (hidden 16) ORT's per-call overhead is most
    # of both, and a busy machine has put a one-token step above a 16-token prefill
    assert 0 < ceiling["single"]["step_p50_s"] < 0.1
    assert 0 < ceiling["single"]["prefill_p50_s"] < 0.1
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
    # the churn ceilings too, fed the mix the server rows are: both recorded, to compare
    assert ceiling["churn"]["mixed"][0]["tokens_per_s"] == pytest.approx(
        (before["churn"]["mixed"][0]["tokens_per_s"] + after["churn"]["mixed"][0]["tokens_per_s"])
        / 2
    )
    fed = res["workloads"]["mixed"]["prompt_tokens_per_output_token"]
    for r in ceiling["churn"]["mixed"]:  # a few dozen requests in a 0.2 s quick ceiling
        assert r["prompt_tokens_per_output_token"] == pytest.approx(fed, rel=0.2)
    assert all(r["prompt_tokens_per_output_token"] > 0 for r in res["closed_loop"]["mixed"])
    assert "prompt tokens per output token" in done.stdout
    assert results["complete"] and not (tmp_path / "traffic.partial.json").exists()
    assert res["engine_settings"]["intra_op_threads"] == ceiling["threads"]
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
            assert r["window_error_count"] == r["warmup_error_count"] == 0
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


TEXT = "the time traveller for so it will be convenient to speak of him " * 400


def test_balanced_order_gives_every_prefix_the_mix_of_the_whole() -> None:
    """The churn ceiling admits only ~200-330 requests in its second; in workload order the
    first 300 had ~4.5% more prompt per output token than the whole the server rows are fed."""
    work = traffic.mixed_workload(TEXT)
    sizes = [(len(p), n) for p, n in work.requests]
    whole = work.spec["prompt_tokens_per_output_token"]
    assert traffic.prompt_per_output(sizes) == pytest.approx(whole)
    assert abs(traffic.prompt_per_output(sizes[:300]) / whole - 1) > 0.02  # what went wrong
    order = traffic.balanced_order(sizes)
    assert sorted(order) == list(range(len(sizes)))
    for start, k in ((0, 100), (0, 300), (128, 300), (0, 1000)):
        got = traffic.prompt_per_output([sizes[i] for i in order[start : start + k]])
        assert got == pytest.approx(whole, rel=0.01)
        outs = [sizes[i][1] for i in order[start : start + k]]
        assert np.mean(outs) == pytest.approx(np.mean([n for _, n in sizes]), rel=0.01)
    # the shape is kept too, long tail included, not just the means
    long = np.mean([n > 300 for _, n in sizes])
    assert np.mean([sizes[i][1] > 300 for i in order[:300]]) == pytest.approx(long, rel=0.2)
    fixed = traffic.fixed_workload(TEXT, n=64)
    assert traffic.balanced_order([(len(p), n) for p, n in fixed.requests]) == list(range(64))
    assert traffic.balanced_order([]) == [] and traffic.prompt_per_output([]) is None


class FakeBare:
    """bare_churn's view of Bare without a model: no state tensors, every step argmax 0."""

    threads = 1
    m = SimpleNamespace(state=[])
    encoded = traffic.Bare.encoded

    def __init__(self) -> None:
        self._encoded: dict = {}

    def ids(self, texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts), len(texts[0])), dtype=np.int64)

    def run(self, x: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        return np.zeros((len(x), 1), dtype=np.int64), {}

    def put_row(self, state: dict, row: int, one: dict) -> None:
        pass


def test_churn_ceilings_are_fed_the_workload_mix_and_record_it() -> None:
    work = traffic.mixed_workload(TEXT, n=512)
    bare = FakeBare()
    sizes = [(ids.shape[1], n) for ids, n in bare.encoded(work)]
    assert sorted(sizes) == sorted((len(p), n) for p, n in work.requests)  # the whole workload
    whole = work.spec["prompt_tokens_per_output_token"]
    assert traffic.prompt_per_output(sizes[:100]) == pytest.approx(whole, rel=0.02)
    for row in (traffic.bare_churn(bare, work, 4, 0.05),
                traffic.bare_churn_in_step(bare, work, 4, 0.05)):  # fmt: skip
        assert row["requests_sampled"] > 0 and row["tokens_per_s"] > 0
        assert row["prompt_tokens_per_output_token"] > 0


def test_mean_of_passes_averages_the_churn_ceilings_too() -> None:
    def one(v: float, sampled: int, ttft) -> dict:
        row = {"slots": 4, "tokens_per_s": v, "ttft_p50_s": ttft,
               "prompt_tokens_per_output_token": v / 100, "requests_sampled": sampled}  # fmt: skip
        return {"single": {"prompt_chars": 16, "step_p50_s": v}, "static": [], "steps_only": [],
                "churn": {"mixed": [row]}, "prompt_in_step": {"mixed": [row]}}  # fmt: skip

    mean = traffic.mean_of_passes([one(10.0, 300, 0.5), one(20.0, 310, None)])
    assert set(mean) == set(traffic.PASS_CEILINGS)
    (row,) = mean["churn"]["mixed"]
    assert row["tokens_per_s"] == 15.0
    assert row["prompt_tokens_per_output_token"] == pytest.approx(0.15)
    assert row["slots"] == 4 and row["requests_sampled"] == 305 and row["ttft_p50_s"] is None
    assert mean["single"] == {"prompt_chars": 16, "step_p50_s": 15.0}


class Message:
    def __init__(self, k: int) -> None:
        self.token_ids = (7,) * k


class Stub:
    """Generate streams `messages`, then fails with `error` when given."""

    def __init__(self, messages: list[int], error=None) -> None:
        self.messages, self.error = messages, error

    def Generate(self, request, timeout):
        async def stream():
            for k in self.messages:
                yield Message(k)
            if self.error is not None:
                raise self.error

        return stream()


def test_errors_are_split_into_warm_up_and_window() -> None:
    """Goodput and the percentiles count the requests started in the window; the errors column
    counted the warm-up's too. The JSON keeps that total and adds the split."""
    import grpc

    unavailable = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                       grpc.aio.Metadata())  # fmt: skip
    tally = traffic.Tally(w0=10.0, w1=20.0)
    req = SimpleNamespace(prompt="abcdefgh")
    for scheduled in (5.0, 6.0, 15.0):  # two in the warm-up, one in the window
        assert not asyncio.run(traffic.one_request(Stub([], unavailable), req, tally, scheduled))
    row = traffic.summarize(tally, duration=10.0)
    assert row["errors"] == {"UNAVAILABLE": 3} and row["error_count"] == 3
    assert row["window_errors"] == {"UNAVAILABLE": 1} and row["window_error_count"] == 1
    assert row["warmup_error_count"] == 2 and row["measured_requests"] == 1
    assert traffic.window_errors(row) == 1
    assert traffic.window_errors({"error_count": 4}) == 4  # a row written before the split
    assert "errors 1 (+2 in warm-up)" in traffic._errors(row)


def test_server_rows_record_the_mix_of_their_window() -> None:
    tally = traffic.Tally(w0=0.0, w1=float("inf"))
    for prompt in ("abcdefgh", "abcd"):  # 12 prompt tokens, 8 output tokens
        req = SimpleNamespace(prompt=prompt)
        assert asyncio.run(traffic.one_request(Stub([1, 3]), req, tally, time.perf_counter()))
    row = traffic.summarize(tally, duration=1.0)
    assert row["prompt_tokens_per_output_token"] == pytest.approx(1.5)
    assert traffic.summarize(traffic.Tally(0.0, 1.0), 1.0)["prompt_tokens_per_output_token"] is None


def test_bare_ceiling_and_engine_follow_the_server_args(monkeypatch) -> None:
    """An A/B run's --server-args thread flags moved the server but not bare ORT or the engine
    alone, which read the plain defaults."""
    monkeypatch.delenv("RNNSERVE_INTRA_OP_THREADS", raising=False)
    s = traffic.server_settings("--intra-op-threads 2 --max-batch 8 --workers 2")
    assert traffic.bare_threads(None, s) == (2, "server --intra-op-threads")
    assert traffic.bare_threads(3, s) == (3, "--bare-threads")
    used = traffic.engine_settings(s)
    assert used["intra_op_threads"] == 2 and used["max_batch"] == 8
    assert used["not_modelled"] == {"workers": 2}  # the engine alone is one in-process loop
    assert traffic.engine_settings(traffic.server_settings(""))["not_modelled"] == {}
    monkeypatch.setenv("RNNSERVE_INTRA_OP_THREADS", "4")  # the server reads it too
    assert traffic.bare_threads(None, traffic.server_settings(""))[0] == 4
    with pytest.raises(SystemExit):  # a bad flag stops the run before minutes of ceilings
        traffic.server_settings("--no-such-flag 1")


class FailingServer:
    """A variant server that would not start: writes its log, then exits as Server does."""

    def __init__(self, repo, extra, log=None) -> None:
        log.write_text("rnn-server: error: unrecognized arguments\n")
        raise SystemExit("error: rnn-server exited with 2")


class DyingServer:
    stopped = 0

    def __init__(self, repo, extra, log=None) -> None:
        self.log = log

    def stop(self) -> None:
        DyingServer.stopped += 1


def test_a_failed_variant_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path) -> None:
    """A variant server that would not start raised SystemExit and threw away every result of
    the run (written only at the end): now its error is returned beside the rows it made."""
    monkeypatch.setattr(traffic.tempfile, "gettempdir", lambda: str(tmp_path))  # its log
    args = SimpleNamespace(server_args="", warmup=0.0, duration=0.1)
    work = traffic.fixed_workload(TEXT, n=8)
    monkeypatch.setattr(traffic, "Server", FailingServer)
    rows, failure = traffic.variant_rows("lstm", tmp_path, args, [1, 4], work, "workers_2")
    assert rows == [] and "exited with 2" in failure["error"]
    assert "unrecognized arguments" in failure["server_log_tail"]
    assert Path(failure["server_log"]).parent == tmp_path  # kept for the operator

    async def closed_loop(server, model, c, workload, warmup, duration) -> dict:
        if c == 4:
            raise TimeoutError("level C=4 hung")
        return {"clients": c, "tokens_per_s": 1.0, "ttft_p50_s": 0.1, "tpot_p50_s": 0.1,
                "error_count": 0}  # fmt: skip

    monkeypatch.setattr(traffic, "Server", DyingServer)
    monkeypatch.setattr(traffic, "closed_loop", closed_loop)
    rows, failure = traffic.variant_rows("lstm", tmp_path, args, [1, 4], work, "workers_2")
    assert [r["clients"] for r in rows] == [1] and "C=4 hung" in failure["error"]
    assert DyingServer.stopped == 1  # the server is stopped all the same


def test_markdown_shows_window_errors_and_failed_variants() -> None:
    tally = traffic.Tally(w0=0.0, w1=1.0, errors=Counter(UNAVAILABLE=5),
                          window_errors=Counter(UNAVAILABLE=2))  # fmt: skip
    row = {**traffic.summarize(tally, 1.0), "clients": 1, "vs_bare_static": None}
    res = {
        "ceiling": {"threads": 2, "single": {"prefill_p50_s": 1e-3, "prompt_chars": 16,
                                             "step_p50_s": 1e-4},
                    "static": [{"batch": 1, "tokens_per_s": 1000.0}], "churn": {}},
        "closed_loop": {"fixed": [row]},
        "targets": [],
        "variants": {"workers_2": [row], "decode_process": []},
        "variant_failures": {"workers_2": {"error": "TimeoutError: C=8 hung"},
                             "decode_process": {"error": "SystemExit: exited with 2"}},
    }  # fmt: skip
    text = traffic.markdown({"models": {"lstm": res}})
    assert "(2 threads" in text and "errors (window)" in text
    assert "| fixed | 1 |" in text and "| 2 | 0.00 |" in text  # the window's 2, not the 5
    assert "**failed** after 1 level(s): TimeoutError: C=8 hung" in text
    assert "**failed** after 0 level(s): SystemExit: exited with 2" in text
