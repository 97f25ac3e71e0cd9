"""The compose topology as plain processes: two `rnn-server` replicas sharing a state key,
scraped by a real Prometheus started from deploy/prometheus.yml (targets rewritten to
localhost, 1 s scrapes), driven with real gRPC traffic.

Shows: the latency histogram and time-to-first-token series reach Prometheus from every
replica; every metric the Grafana dashboard names is scraped and every dashboard query runs
(the second replica runs --decode-process 1, whose children have their own panels);
the alert rules load; the images' health check script sees the real server; a resume token
from one replica continues the stream on the other (what the Envoy profile relies on).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from tests.tools import need
from tests.unit.deploy.deployfiles import (
    DEPLOY,
    dashboard_exprs,
    grafana_to_promql,
    promql_metric_names,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "lstm"  # in every zoo preset (docs/contracts.md)
STATE_KEY = "e2e-shared-state-key"
READY_WAIT_S = 90.0  # upper bounds on waiting, not assertions about speed
SCRAPE_WAIT_S = 120.0
RPC_TIMEOUT_S = 30.0  # every call has a deadline: a stuck server fails the test, not hangs it
# Metrics a panel may name before any server records them (none today).
AWAITING_ENGINE: set[str] = set()


@dataclass
class Replica:
    process: subprocess.Popen
    port: int
    metrics_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_for(what: str, probe: Callable[[], object], deadline_s: float, procs=()) -> object:
    """Polls `probe` until it returns something truthy; fails with `what` past the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        for proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: process exited with {proc.returncode}:\n{_tail(log)}")
        result = probe()
        if result:
            return result
        if time.monotonic() > end:
            logs = "\n".join(_tail(log) for _, log in procs)
            pytest.fail(f"gave up waiting: {what}\n{logs}")
        time.sleep(0.5)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _healthcheck_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _server_cmd() -> list[str]:
    script = Path(sys.executable).with_name("rnn-server")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rnnserve.server.main"]


@pytest.fixture(scope="module")
def replicas(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    logs = tmp_path_factory.mktemp("replica-logs")
    env = {**os.environ, "RNNSERVE_STATE_KEY": STATE_KEY, "RNNSERVE_LOG_LEVEL": "WARNING"}
    started: list[Replica] = []
    try:
        for i in range(2):
            port, metrics_port = _free_port(), _free_port()
            log = logs / f"replica{i}.log"
            cmd = [
                *_server_cmd(), "--model-repo", str(model_repo), "--host", "127.0.0.1",
                "--port", str(port), "--metrics-port", str(metrics_port),
                # the second steps in child processes: the decode-process panels get data
                "--decode-process", str(i),
            ]  # fmt: skip
            with log.open("w") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            started.append(Replica(proc, port, metrics_port, log))
        health = _healthcheck_module()
        for r in started:
            _wait_for(
                f"replica on {r.target} SERVING",
                lambda r=r: health.check(r.target, "rnnserve.v1.Inference", timeout=2.0)[0],
                READY_WAIT_S,
                [(r.process, r.log)],
            )
        yield started
    finally:
        for r in started:
            _stop(r.process)


def _prometheus_config(replicas: list[Replica], web_port: int) -> dict:
    """deploy/prometheus.yml with the compose DNS discovery swapped for the local replicas."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        if job["job_name"] == "rnnserve":
            assert job.pop("dns_sd_configs"), "the compose config discovers replicas by DNS"
            job["static_configs"] = [{"targets": [f"127.0.0.1:{r.metrics_port}" for r in replicas]}]
        elif job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{web_port}"]}]
    # no Envoy runs here (its job only finds targets in the compose profile `scale`)
    config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"] != "envoy"]
    return config


@pytest.fixture(scope="module")
def prometheus(
    replicas: list[Replica], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str, dict], dict]]:
    binary = need("prometheus", "Debian package `prometheus`; `make system-deps`")
    work = tmp_path_factory.mktemp("prometheus")
    port = _free_port()
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(replicas, port)))
    log = work / "prometheus.log"
    cmd = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def api(path: str, params: dict | None = None) -> dict:
        url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())

    def ready() -> bool:
        url = f"{base}/-/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
        return False

    try:
        _wait_for("prometheus ready", ready, READY_WAIT_S, [(proc, log)])
        yield api
    finally:
        _stop(proc)


def _traffic(replica: Replica) -> None:
    """One round of real calls: a Generate stream, a Score, and one NOT_FOUND error."""
    with grpc.insecure_channel(replica.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        replies = list(
            stub.Generate(
                pb.GenerateRequest(model=MODEL, prompt="the time ", max_tokens=6),
                timeout=RPC_TIMEOUT_S,
            )
        )
        assert replies and replies[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        score = stub.Score(
            pb.ScoreRequest(model=MODEL, texts=["the time traveller"]), timeout=RPC_TIMEOUT_S
        )
        assert score.results[0].num_tokens > 0
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(pb.ScoreRequest(model="no-such-model", texts=["ab"]), timeout=RPC_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _query(api, expr: str) -> list[dict]:
    reply = api("/api/v1/query", {"query": expr})
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


@pytest.fixture(scope="module")
def scraped(replicas: list[Replica], prometheus) -> Callable:
    """Drives traffic at every replica until Prometheus has seen it rise across scrapes."""
    instances = {f"127.0.0.1:{r.metrics_port}" for r in replicas}

    def seen() -> bool:
        for r in replicas:
            _traffic(r)
        needed = [
            "sum by (instance) "
            '(rate(rnnserve_request_duration_seconds_count{rpc="Score"}[1m])) > 0',
            "sum by (instance) (rate(rnnserve_time_to_first_token_seconds_count[1m])) > 0",
        ]
        return all(
            {s["metric"]["instance"] for s in _query(prometheus, q)} == instances for q in needed
        )

    _wait_for("traffic visible in Prometheus", seen, SCRAPE_WAIT_S)
    return prometheus


def test_health_script_sees_the_real_server(replicas: list[Replica], capsys) -> None:
    health = _healthcheck_module()
    for r in replicas:
        assert health.main([r.target]) == 0
        assert health.main([r.target, MODEL]) == 0, "one health service per model"
        assert health.main([r.target, "no-such-model"]) == 1
    assert "SERVING" in capsys.readouterr().out
    # Exactly as the images run it (HEALTHCHECK CMD python /opt/rnnserve/healthcheck.py):
    # no arguments, the port from RNNSERVE_PORT.
    env = {**os.environ, "RNNSERVE_PORT": str(replicas[0].port)}
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_replica_is_scraped(scraped) -> None:
    up = _query(scraped, 'up{job="rnnserve"}')
    assert len(up) == 2
    assert all(s["value"][1] == "1" for s in up)


def test_latency_histogram_and_time_to_first_token_are_scraped(
    scraped, replicas: list[Replica]
) -> None:
    buckets = _query(scraped, 'rnnserve_request_duration_seconds_bucket{rpc="Generate"}')
    assert {s["metric"]["le"] for s in buckets} >= {"0.001", "1.0", "+Inf"}
    assert {s["metric"]["model"] for s in buckets} == {MODEL}
    ttft = _query(scraped, "rnnserve_time_to_first_token_seconds_bucket")
    assert {s["metric"]["instance"] for s in ttft} == {
        f"127.0.0.1:{r.metrics_port}" for r in replicas
    }
    p99 = _query(
        scraped,
        "histogram_quantile(0.99, sum by (le, rpc) "
        "(rate(rnnserve_request_duration_seconds_bucket[1m])))",
    )
    assert {"Generate", "Score"} <= {s["metric"]["rpc"] for s in p99}
    errors = _query(scraped, 'rnnserve_errors_total{rpc="Score", code="NOT_FOUND"}')
    assert errors and all(float(s["value"][1]) >= 1 for s in errors)


def test_every_dashboard_metric_is_scraped_and_every_query_runs(scraped) -> None:
    names = set().union(*(promql_metric_names(e) for _, e in dashboard_exprs()))
    missing = {n for n in names if not _query(scraped, f'count({{__name__="{n}"}})')}
    assert missing <= AWAITING_ENGINE, (
        f"dashboard names metrics the server does not export: {missing}"
    )
    for _, expr in dashboard_exprs():
        _query(scraped, grafana_to_promql(expr))  # asserts status == success


def _has_a_number(series: list[dict]) -> bool:
    return any(s["value"][1] not in ("NaN", "+Inf", "-Inf") for s in series)


def test_every_dashboard_panel_shows_data_from_the_live_servers(scraped) -> None:
    """Each panel's query, as Grafana sends it, returns at least one real number after the
    traffic: no panel is empty or NaN (the old model-load panel was NaN once start-up left
    the rate window)."""
    empty = []
    for title, expr in dashboard_exprs():
        if promql_metric_names(expr) & AWAITING_ENGINE:
            continue
        if not _has_a_number(_query(scraped, grafana_to_promql(expr))):
            empty.append((title, expr))
    assert not empty, f"panels without data: {empty}"
    load = [e for t, e in dashboard_exprs() if "rnnserve_model_load_seconds" in e]
    assert load and not any("rate(" in e for e in load), "load events are over at start-up"


def test_new_metrics_reach_prometheus(scraped) -> None:
    assert _query(scraped, 'sum by (instance) (rnnserve_ready{job="rnnserve"}) == 1')
    assert len(_query(scraped, "rnnserve_build_info == 1")) == 2
    capacity = _query(scraped, "sum(rnnserve_stream_capacity)")
    assert float(capacity[0]["value"][1]) == 2 * 512
    finished = _query(scraped, "sum by (finish_reason) (rnnserve_finished_streams_total)")
    assert {s["metric"]["finish_reason"] for s in finished} & {"length", "stop", "eos"}
    assert _query(scraped, 'process_resident_memory_bytes{job="rnnserve"} > 0')
    fine = _query(scraped, 'rnnserve_inter_token_latency_seconds_bucket{le="1e-05"}')
    assert fine, "the 10 us bucket is exported"


def test_decode_process_metrics_come_from_the_children(scraped, replicas: list[Replica]) -> None:
    """Only the --decode-process 1 replica has children; they hold memory and used CPU."""
    child = {f"127.0.0.1:{replicas[1].metrics_port}"}
    for expr in (
        f'rnnserve_decode_process_resident_memory_bytes{{model="{MODEL}"}} > 0',
        f'rnnserve_decode_process_cpu_seconds_total{{model="{MODEL}"}} > 0',
    ):
        assert {s["metric"]["instance"] for s in _query(scraped, expr)} == child, expr


def test_engine_metrics_are_recorded(scraped) -> None:
    """The decode engine counts prompt tokens and finished streams by reason."""
    for name in ("rnnserve_prompt_tokens_total", "rnnserve_finished_streams_total"):
        assert _query(scraped, f"sum({name}) > 0"), name


def test_alert_rules_are_loaded(scraped) -> None:
    def evaluated() -> list[dict]:
        groups = scraped("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return (
            rules
            if rules and all(r.get("lastEvaluation", "0001").startswith("2") for r in rules)
            else []
        )

    rules = _wait_for("alert rules evaluated", evaluated, SCRAPE_WAIT_S)
    expected = {
        r["alert"]
        for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    assert {r["name"] for r in rules} == expected
    assert all(r["health"] == "ok" for r in rules), [r.get("lastError") for r in rules]
    firing = {r["name"] for r in rules if r["state"] == "firing"}
    assert "RnnserveDown" not in firing and "RnnserveNoModelServing" not in firing


def _generate(target: str, **fields) -> tuple[list[int], pb.GenerateResponse]:
    with grpc.insecure_channel(target) as channel:
        replies = list(
            pb_grpc.InferenceStub(channel).Generate(
                pb.GenerateRequest(model=MODEL, **fields), timeout=RPC_TIMEOUT_S
            )
        )
    return [t for r in replies for t in r.token_ids], replies[-1]


def test_resume_token_continues_on_the_other_replica(replicas: list[Replica]) -> None:
    """What Envoy's balancing relies on: no stickiness, any replica continues any stream."""
    a, b = replicas
    first, last = _generate(a.target, prompt="the time ", max_tokens=5, return_state=True)
    assert last.state, "return_state gives a resume token on the last message"
    assert last.finish_reason == pb.FINISH_REASON_LENGTH  # no <eos> in the corpus, no stops
    rest, _ = _generate(b.target, state=last.state, max_tokens=5)
    whole, _ = _generate(a.target, prompt="the time ", max_tokens=10)
    assert first + rest == whole[: len(first) + len(rest)]
    assert len(first) + len(rest) > len(first)
