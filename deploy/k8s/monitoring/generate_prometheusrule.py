"""Writes prometheusrule.yaml (a Prometheus Operator PrometheusRule) from deploy/alerts.yml,
the one source of the alert rules. Run it after editing the alerts:

    python deploy/k8s/monitoring/generate_prometheusrule.py

tests/unit/deploy/test_k8s.py fails while the committed file differs from what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parents[1] / "alerts.yml"
OUTPUT = HERE / "prometheusrule.yaml"
HEADER = (
    "# GENERATED from deploy/alerts.yml by deploy/k8s/monitoring/generate_prometheusrule.py;\n"
    "# edit the alerts there and rerun the script.\n"
)


def render(alerts_text: str) -> str:
    """The PrometheusRule manifest for the rule groups of an alerts file."""
    groups = yaml.safe_load(alerts_text)["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "rnnserve",
            "namespace": "rnnserve",
            "labels": {"app.kubernetes.io/name": "rnnserve"},
        },
        "spec": {"groups": groups},
    }
    body = yaml.safe_dump(rule, sort_keys=False, width=1000, allow_unicode=True)
    return HEADER + body


def main() -> int:
    OUTPUT.write_text(render(ALERTS.read_text()))
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
