"""The Grafana dashboard: it shows what issue 8 asks for, names only metrics that are both in
the README's Metrics table and exported by server.metrics, and uses the provisioned datasource."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.unit.deploy.deployfiles import (
    DASHBOARD,
    DEPLOY,
    REPO_ROOT,
    contract_metrics,
    dashboard_exprs,
    promql_metric_names,
    sample_names,
)

PROMETHEUS_BUILTINS = {"up"}


def _exported_samples() -> set[str]:
    """Series names the real server.metrics registry exports, from its metric families."""
    from rnnserve.server.metrics import Metrics

    out = set()
    for family in Metrics().registry.collect():
        out |= sample_names(family.name, family.type)
    return out


def _contract_samples() -> set[str]:
    return {s for name, kind in contract_metrics().items() for s in sample_names(name, kind)}


def test_contract_table_is_read() -> None:
    metrics = contract_metrics()
    assert len(metrics) >= 11
    assert metrics["rnnserve_request_duration_seconds"] == "histogram"


def test_promql_name_extraction() -> None:
    expr = 'sum by (le, rpc) (rate(foo_bucket{model=~"a|b", rpc!="x"}[5m])) / on (rpc) bar'
    assert promql_metric_names(expr) == {"foo_bucket", "bar"}
    assert promql_metric_names("histogram_quantile(0.99, sum(rate(x_bucket[1m])))") == {"x_bucket"}


def test_server_exports_every_contract_metric() -> None:
    assert _contract_samples() <= _exported_samples(), _contract_samples() - _exported_samples()


def test_contract_table_types_and_labels_are_the_servers() -> None:
    """Each rnnserve_* row of the README's table names the type and labels server.metrics
    gives it (a dashboard or alert written from the table must find its series)."""
    from prometheus_client import Counter, Gauge, Histogram

    from rnnserve.server.metrics import Metrics

    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`(rnnserve_[a-z_]+)`\s*\|\s*([a-z]+)\s*\|([^|]*)\|", section, re.M)
    table = {name: (kind, tuple(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}
    server = {
        m._name + ("_total" if isinstance(m, Counter) else ""): (m._type, tuple(m._labelnames))
        for m in vars(Metrics()).values()
        if isinstance(m, Counter | Gauge | Histogram)
    }
    assert table == server


def test_dashboard_names_only_contract_and_exported_metrics() -> None:
    allowed = (_contract_samples() & _exported_samples()) | PROMETHEUS_BUILTINS
    for title, expr in dashboard_exprs():
        names = promql_metric_names(expr)
        assert names, (title, expr)
        assert names <= allowed, (title, names - allowed)


@pytest.mark.parametrize(
    "needle",
    [
        "rnnserve_request_duration_seconds_bucket",  # latency by rpc
        "rnnserve_time_to_first_token_seconds_bucket",
        "rnnserve_inter_token_latency_seconds_bucket",
        "rnnserve_generated_tokens_total",  # tokens/s
        "rnnserve_live_streams",
        "rnnserve_errors_total",
        # --decode-process 1: the children's CPU and memory, which process_* leaves out
        "rnnserve_decode_process_cpu_seconds_total",
        "rnnserve_decode_process_resident_memory_bytes",
    ],
)
def test_dashboard_shows_the_required_series(needle: str) -> None:
    assert any(
        needle in names for names in map(promql_metric_names, (e for _, e in dashboard_exprs()))
    )


def test_latency_panel_has_p50_and_p99_by_rpc() -> None:
    exprs = [e for _, e in dashboard_exprs() if "request_duration_seconds_bucket" in e]
    for q in ("0.5", "0.99"):
        assert any(f"histogram_quantile({q}," in e and "by (le, rpc)" in e for e in exprs), q


def test_dashboard_uses_the_provisioned_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    (source,) = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert source["type"] == "prometheus"
    refs = [p["datasource"] for p in dash["panels"]]
    refs += [t["datasource"] for p in dash["panels"] for t in p["targets"]]
    refs += [v["datasource"] for v in dash["templating"]["list"]]
    assert all(r == {"type": "prometheus", "uid": source["uid"]} for r in refs)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] and dash["title"]
