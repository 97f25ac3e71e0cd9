"""deploy/k8s: every manifest valid against the Kubernetes schema (strict), and the pieces
agree with each other and with the server (ports, probes, volumes, secret, labels)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.unit.deploy.deployfiles import K8S, k8s_docs, k8s_one

# The oldest Kubernetes we document (native gRPC probes are GA from 1.27) and the newest
# schema the installed kubernetes-validate knows; old schemas drop out of newer releases.
OLDEST_SUPPORTED = "1.30"
# Custom resources and kustomize's own file have no schema in kubernetes-validate.
NOT_CORE = {"Kustomization", "ServiceMonitor"}


def _server_container() -> dict:
    (container,) = k8s_one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


@pytest.mark.parametrize(
    "path,doc",
    [(p, d) for p, d in k8s_docs() if d["kind"] not in NOT_CORE],
    ids=lambda v: v.name if hasattr(v, "name") else v["kind"],
)
def test_schema_valid(path, doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import all_versions, latest_version

    known = {v.rsplit(".", 1)[0] for v in all_versions()}
    versions = {latest_version()} | ({OLDEST_SUPPORTED} & known)
    for version in sorted(versions):
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']} (Kubernetes {version}): {exc}")


def test_schema_check_rejects_a_misspelled_field() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    deployment = k8s_one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    from kubernetes_validate.utils import latest_version

    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, latest_version(), strict=True)


def test_kustomization_lists_every_core_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert all((K8S / r).exists() for r in listed)
    files = {p.name for p, d in k8s_docs() if d["kind"] not in NOT_CORE}
    assert files == listed
    for _, doc in k8s_docs():
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == kust["namespace"]
        elif doc["kind"] != "Kustomization":
            assert doc["metadata"]["namespace"] == kust["namespace"], doc["metadata"]["name"]


def test_grpc_probes_target_the_grpc_port(server_parser) -> None:
    container = _server_container()
    settings = server_parser.parse_args(container["args"])
    assert _ports(container) == {"grpc": settings.port, "metrics": settings.metrics_port}
    assert (settings.port, settings.metrics_port) == (50051, 8000)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.port, probe


def test_model_volume_is_the_model_repo_and_shared_with_the_trainer(server_parser) -> None:
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    container = _server_container()
    repo = str(server_parser.parse_args(container["args"]).model_repo)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == repo]
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert k8s_one("PersistentVolumeClaim", claim)
    job_pod = k8s_one("Job")["spec"]["template"]["spec"]
    (job_volume,) = job_pod["volumes"]
    assert job_volume["persistentVolumeClaim"]["claimName"] == claim
    (trainer,) = job_pod["containers"]
    assert {m["mountPath"] for m in trainer["volumeMounts"]} == {repo}
    assert re.search(rf"rnn-trainer zoo (--preset \w+ )?--out {repo} &&", trainer["args"][0])
    # Server pods wait for the marker the Job writes last.
    (wait,) = pod["initContainers"]
    assert f"{repo}/.zoo-complete" in wait["args"][0]
    assert f"touch {repo}/.zoo-complete" in trainer["args"][0]


def test_env_names_are_real_flags_and_the_state_key_comes_from_a_secret(server_flags) -> None:
    env = {e["name"]: e for e in _server_container()["env"]}
    assert set(env) <= server_flags.env, set(env) - server_flags.env
    ref = env["RNNSERVE_STATE_KEY"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("rnnserve-state-key", "state-key")
    assert "value" not in env["RNNSERVE_STATE_KEY"], "never a literal key in the manifest"


def test_every_container_has_requests_limits_and_runs_as_non_root() -> None:
    for kind in ("Deployment", "Job"):
        pod = k8s_one(kind)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the images' user
        for c in pod.get("initContainers", []) + pod["containers"]:
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) & set(res["limits"]), c["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_services_select_the_pods_and_name_their_ports() -> None:
    deployment = k8s_one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = _ports(_server_container())
    services = [d for _, d in k8s_docs() if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"rnnserve", "rnnserve-headless"}
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        for port in svc["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"]
    assert k8s_one("Service", "rnnserve-headless")["spec"]["clusterIP"] == "None"


def test_hpa_and_pdb_target_the_deployment() -> None:
    deployment = k8s_one("Deployment")
    hpa = k8s_one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    pdb = k8s_one("PodDisruptionBudget")["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"], "a drain must be able to evict a pod"


def test_scrape_annotations_and_service_monitor_point_at_the_metrics_port() -> None:
    pod = k8s_one("Deployment")["spec"]["template"]
    notes = pod["metadata"]["annotations"]
    ports = _ports(_server_container())
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == ports["metrics"]
    assert notes["prometheus.io/path"] == "/metrics"
    monitor = k8s_one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    svc = k8s_one("Service", "rnnserve")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == notes["prometheus.io/path"]
