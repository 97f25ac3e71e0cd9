"""Readers for the files under deploy/: compose (with ${VAR:-default} interpolation), k8s
documents, Dockerfile instructions, the metric table of README.md, PromQL names.

Pure helpers (no pytest), shared by the unit tests here and tests/e2e/test_prometheus_scrape.py.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rnnserve.json"
DOCKERFILES = ("Dockerfile", "Dockerfile.trainer", "Dockerfile.gpu")

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's ${VAR}, ${VAR:-default} substitution, applied recursively (env: {} = defaults)."""
    env = env or {}
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(3) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def load_compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env)


def k8s_docs() -> list[tuple[Path, dict]]:
    """Every YAML document of deploy/k8s and deploy/k8s/monitoring, with its file (other
    subfolders are separate deployments with their own tests)."""
    docs = []
    for path in sorted([*K8S.glob("*.yaml"), *(K8S / "monitoring").glob("*.yaml")]):
        docs.extend((path, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def kustomize(folder: Path) -> list[dict]:
    """What `kubectl kustomize <folder>` renders, for the features our kustomizations use:
    file resources, `namespace`, and `labels` pairs (metadata only: no includeSelectors or
    includeTemplates). Anything else raises, so a new feature cannot be silently ignored."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources"}
    assert set(kust) <= known, f"kustomize() does not implement {set(kust) - known}"
    out = []
    for resource in kust["resources"]:
        for doc in yaml.safe_load_all((folder / resource).read_text()):
            if not doc:
                continue
            meta = doc.setdefault("metadata", {})
            if "namespace" in kust and doc["kind"] not in CLUSTER_SCOPED:
                meta["namespace"] = kust["namespace"]
            for group in kust.get("labels", []):
                assert set(group) == {"pairs"}, f"kustomize() implements only pairs: {group}"
                meta.setdefault("labels", {}).update(group["pairs"])
            out.append(doc)
    return out


def pod_specs(doc: dict) -> list[dict]:
    """The pod specs a workload document creates (Pod, Deployment, Job, CronJob, ...)."""
    kind = doc.get("kind")
    if kind == "Pod":
        return [doc["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    template = doc.get("spec", {}).get("template")
    return [template["spec"]] if isinstance(template, dict) and "spec" in template else []


def k8s_one(kind: str, name: str | None = None) -> dict:
    found = [
        d
        for _, d in k8s_docs()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@dataclass
class Stage:
    """One FROM ... stage of a Dockerfile: its base image and instructions (joined lines)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def dockerfile_stages(path: Path) -> list[Stage]:
    """Splits a Dockerfile into stages; continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), " ".join(rest.split())
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def exec_form(arg: str) -> list[str]:
    """["a", "b"] (JSON exec form) or a shell-form string, as an argv list."""
    return json.loads(arg) if arg.startswith("[") else shlex.split(arg)


def healthcheck_cmd(stage: Stage) -> list[str]:
    (hc,) = stage.args("HEALTHCHECK")
    return exec_form(hc.split(" CMD ", 1)[1])


def contract_metrics() -> dict[str, str]:
    """{metric name: type} from the Metrics table of README.md (the one list of metrics)."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`((?:rnnserve|process)_[a-z_]+)`\s*\|\s*([a-z]+)", section, re.M)
    return dict(rows)


def sample_names(name: str, kind: str) -> set[str]:
    """The series names Prometheus stores for one metric of the given type."""
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "counter":
        return {name if name.endswith("_total") else f"{name}_total"}
    return {name}


_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label matchers, groupings, functions removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr):
        if m.group(1).lower() not in _PROMQL_WORDS:
            names.add(m.group(1))
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the Grafana dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """Replaces Grafana's variables so Prometheus (or promtool) can evaluate the query."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*")
