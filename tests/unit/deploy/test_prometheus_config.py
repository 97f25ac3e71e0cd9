"""Prometheus side: promtool accepts the compose and k8s configs and the alert rules, the
alert unit tests pass, and every dashboard/alert query is valid PromQL on contract metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tools import need
from tests.unit.deploy.deployfiles import (
    DEPLOY,
    contract_metrics,
    dashboard_exprs,
    grafana_to_promql,
    k8s_one,
    promql_metric_names,
    sample_names,
)


def _promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess:
    tool = need("promtool", "Debian package `prometheus`; `make system-deps`")
    return subprocess.run([tool, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout + done.stderr


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for g in groups for rule in g["rules"]]


def test_promtool_check_config() -> None:
    _ok(_promtool("check", "config", "prometheus.yml"))


def test_promtool_check_rules() -> None:
    _ok(_promtool("check", "rules", "alerts.yml"))


def test_alert_rules_fire_as_intended() -> None:
    """deploy/alerts_test.yml: synthetic series in, expected alerts (and no others) out."""
    _ok(_promtool("test", "rules", "alerts_test.yml"))


def test_every_alert_has_a_test_that_fires_it() -> None:
    """promtool checks only the alerts a test names: an alert with no case in
    alerts_test.yml passes whatever its threshold, `for` or grouping."""
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    untested = {rule["alert"] for rule in _alert_rules()} - fired
    assert not untested, f"no case in alerts_test.yml expects these to fire: {sorted(untested)}"


def test_kubernetes_scrape_config(tmp_path: Path) -> None:
    """The ConfigMap's prometheus.yml, checked by promtool.

    Debian's Prometheus is built without Kubernetes discovery, so when promtool does not know
    kubernetes_sd_configs the same job is checked with static targets: relabelling, paths and
    everything else are still validated.
    """
    text = k8s_one("ConfigMap", "rnnserve-prometheus")["data"]["prometheus.yml"]
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    done = _promtool("check", "config", str(path))
    if done.returncode != 0 and "kubernetes_sd_configs not found" in done.stdout + done.stderr:
        config = yaml.safe_load(text)
        for job in config["scrape_configs"]:
            assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
            job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
        path.write_text(yaml.safe_dump(config))
        done = _promtool("check", "config", str(path))
    _ok(done)


def _pod_targets(ip: str, phase: str = "Running") -> list[dict]:
    """What Kubernetes pod discovery gives for one server pod: a target per container port
    (gRPC, metrics, HTTP), `__address__` joined as Go's net.JoinHostPort does."""
    host = f"[{ip}]" if ":" in ip else ip
    pod = k8s_one("Deployment", "rnnserve-server")["spec"]["template"]
    (server,) = [c for c in pod["spec"]["containers"] if c["name"] == "server"]
    annotations = pod["metadata"]["annotations"]
    return [
        {
            "targets": [f"{host}:{port['containerPort']}"],
            "labels": {
                "__meta_kubernetes_pod_ip": ip,
                "__meta_kubernetes_pod_name": f"rnnserve-{phase.lower()}",
                "__meta_kubernetes_pod_phase": phase,
                "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                **{
                    "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key): value
                    for key, value in annotations.items()
                },
            },
        }
        for port in server["ports"]
    ]


def test_kubernetes_scrape_job_scrapes_only_the_metrics_port(tmp_path: Path) -> None:
    """promtool runs the ConfigMap job's relabelling on the targets pod discovery makes of
    server pods (IPv4, and IPv6 as on IPv6 and IPv6-first dual-stack clusters): one target a
    pod, its annotated metrics port. Any other target is the gRPC or HTTP port: a scrape that
    fails, and RnnserveDown firing for a healthy pod."""
    config = yaml.safe_load(k8s_one("ConfigMap", "rnnserve-prometheus")["data"]["prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
    targets = tmp_path / "pods.json"
    targets.write_text(json.dumps(_pod_targets("10.244.1.7") + _pod_targets("fd00:10:244::7")))
    job["file_sd_configs"] = [{"files": [str(targets)]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    # promtool waits the whole --timeout; a file is read at once
    done = _promtool("check", "service-discovery", "--timeout=3s", str(path), job["job_name"])
    _ok(done)
    found = json.loads(done.stdout)
    assert {t["labels"]["__address__"] for t in found} == {
        "10.244.1.7:8000",
        "[fd00:10:244::7]:8000",
    }
    assert {t["labels"]["__metrics_path__"] for t in found} == {"/metrics"}


@pytest.mark.parametrize("phase", ["Failed", "Succeeded"])
def test_kubernetes_scrape_job_drops_pods_that_ended(tmp_path: Path, phase: str) -> None:
    """A pod the kubelet evicted (node pressure) stays listed, phase Failed, with its IP,
    until the pod garbage collector removes it (by default only past 12500 ended pods).
    Scraped, it is `up == 0` (RnnserveDown fires for a pod that no longer exists), or its
    IP, handed to a new pod, is scraped twice under two pod names. Discovery lists such
    pods; the job must drop them, as the Prometheus Operator does."""
    config = yaml.safe_load(k8s_one("ConfigMap", "rnnserve-prometheus")["data"]["prometheus.yml"])
    (job,) = config["scrape_configs"]
    job.pop("kubernetes_sd_configs")
    targets = tmp_path / "pods.json"
    pods = _pod_targets("10.244.1.7") + _pod_targets("10.244.1.8", phase)
    targets.write_text(json.dumps(pods + _pod_targets("10.244.1.9", "Pending")))
    job["file_sd_configs"] = [{"files": [str(targets)]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    done = _promtool("check", "service-discovery", "--timeout=3s", str(path), job["job_name"])
    _ok(done)
    kept = {t["labels"]["__address__"] for t in json.loads(done.stdout) if t.get("labels")}
    # a Pending pod (its init container fetching the zoo) is kept, as the Operator keeps it
    assert kept == {"10.244.1.7:8000", "10.244.1.9:8000"}


def _contract_samples() -> set[str]:
    return {s for name, kind in contract_metrics().items() for s in sample_names(name, kind)}


def test_alerts_name_only_contract_metrics() -> None:
    allowed = _contract_samples() | {"up"}
    for rule in _alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names and names <= allowed, (rule["alert"], names - allowed)


def test_rates_are_of_counters_and_quantiles_of_buckets_by_le() -> None:
    """rate() of a gauge and histogram_quantile() without `le` parse, and show nonsense."""
    kinds = contract_metrics()
    counters = {
        f"{n}_{s}" for n, k in kinds.items() if k == "histogram" for s in ("bucket", "sum", "count")
    }
    counters |= {s for n, k in kinds.items() if k == "counter" for s in sample_names(n, k)}
    exprs = dashboard_exprs() + [(r["alert"], r["expr"]) for r in _alert_rules()]
    for title, expr in exprs:
        for name in re.findall(r"\b(?:rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)", expr):
            assert name in counters, (title, name)
        for inner in re.findall(r"histogram_quantile\(\s*[\d.]+\s*,(.*)", expr):
            assert "_bucket" in inner and re.search(r"by \([^)]*\ble\b", inner), (title, expr)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as a recording rule) after Grafana's variables
    are filled in the way Grafana fills them."""
    exprs = [grafana_to_promql(e) for _, e in dashboard_exprs()]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _ok(_promtool("check", "rules", str(path)))
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": "sum("}]}]})
    )
    assert _promtool("check", "rules", str(path)).returncode != 0, "promtool must reject bad PromQL"
