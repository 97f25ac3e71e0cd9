"""deploy/k8s: every manifest valid against the Kubernetes schema (strict), the pieces agree
with each other and with the server (ports, probes, volumes, secret, labels), every pod passes
Pod Security "restricted", the storage works on a ReadWriteOnce class, and the monitoring
kustomization carries the PrometheusRule generated from deploy/alerts.yml."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import socket
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

from tests.tools import has_ipv6_loopback, http_status, missing, need, need_module
from tests.unit.deploy.deployfiles import DEPLOY, K8S, k8s_docs, k8s_one, kustomize, pod_specs
from tests.unit.deploy.pss import restricted_violations

# The oldest Kubernetes we document (native gRPC probes are GA from 1.27) and the newest
# schema the installed kubernetes-validate knows; old schemas drop out of newer releases.
OLDEST_SUPPORTED = "1.30"
# Custom resources and kustomize's own file have no schema in kubernetes-validate.
NOT_CORE = {"Kustomization", "ServiceMonitor", "PrometheusRule"}
MONITORING = K8S / "monitoring"
SERVER = "rnnserve-server"


def _server_pod() -> dict:
    return k8s_one("Deployment", SERVER)["spec"]["template"]["spec"]


def _server_container() -> dict:
    (container,) = _server_pod()["containers"]
    return container


def _ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


@pytest.mark.parametrize(
    "path,doc",
    [(p, d) for p, d in k8s_docs() if d["kind"] not in NOT_CORE],
    ids=lambda v: v.name if hasattr(v, "name") else v["kind"],
)
def test_schema_valid(path, doc: dict) -> None:
    kv = need_module("kubernetes_validate", "pip install kubernetes-validate")
    from kubernetes_validate.utils import all_versions, latest_version

    known = {v.rsplit(".", 1)[0] for v in all_versions()}
    versions = {latest_version()} | ({OLDEST_SUPPORTED} & known)
    for version in sorted(versions):
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']} (Kubernetes {version}): {exc}")


def test_schema_check_rejects_a_misspelled_field() -> None:
    kv = need_module("kubernetes_validate", "pip install kubernetes-validate")
    deployment = k8s_one("Deployment", SERVER)
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
    assert all(p.parent == K8S for p, d in k8s_docs() if d["kind"] not in NOT_CORE)
    for _, doc in k8s_docs():
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == kust["namespace"]
        elif doc["kind"] != "Kustomization":
            assert doc["metadata"]["namespace"] == kust["namespace"], doc["metadata"]["name"]


def test_probes_readiness_on_grpc_health_liveness_on_healthz(server_parser) -> None:
    """Readiness is overall gRPC health (NOT_SERVING while no model serves); startup and
    liveness only ask whether the process answers, so an empty repository does not make
    the kubelet restart the pod forever."""
    from wsgiref.util import setup_testing_defaults

    from rnnserve.server.metrics import LOOP_ANSWER_S, Metrics, endpoints_app

    container = _server_container()
    settings = server_parser.parse_args(container["args"])
    ports = _ports(container)
    assert {"grpc": settings.port, "metrics": settings.metrics_port}.items() <= ports.items()
    assert (settings.port, settings.metrics_port) == (50051, 8000)
    assert container["readinessProbe"]["grpc"]["port"] == settings.port
    app = endpoints_app(Metrics().registry, ready=lambda: False)
    for probe in ("startupProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == "metrics", probe
        environ = {"PATH_INFO": get["path"]}
        setup_testing_defaults(environ)
        status: list[str] = []

        def start_response(line: str, headers: list, status: list[str] = status) -> None:
            status.append(line)

        app(environ, start_response)
        assert status == ["200 OK"], f"{probe}: the server answers {get['path']} with {status}"
        # /healthz asks the event loop and waits up to LOOP_ANSWER_S for it: a probe that
        # gives up first (the kubelet's default timeout is 1 s) fails a loop that answered
        assert container[probe].get("timeoutSeconds", 1) > LOOP_ANSWER_S, probe


def test_termination_grace_outlasts_the_servers_own_shutdown(monkeypatch) -> None:
    """SIGTERM -> --drain-delay -> --grace for in-flight calls -> the trace flush: the kubelet
    must not SIGKILL the pod before the server's own shutdown is over."""
    from rnnserve.server.settings import build_parser
    from rnnserve.server.tracing import FLUSH_TIMEOUT_S

    container = _server_container()
    for key in [k for k in os.environ if k.startswith("RNNSERVE_")]:
        monkeypatch.delenv(key)
    for e in container["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    settings = build_parser().parse_args(container["args"])  # reads the environment now
    shutdown_s = float(settings.drain_delay) + float(settings.grace) + FLUSH_TIMEOUT_S
    assert float(settings.drain_delay) > 0, "endpoint removal must reach the proxies first"
    assert _server_pod()["terminationGracePeriodSeconds"] > shutdown_s


def _fetch_script() -> str:
    (fetch,) = _server_pod()["initContainers"]
    assert fetch["command"][:2] == ["python", "-c"]
    return fetch["args"][0]


def test_each_server_pod_fetches_the_zoo_into_its_own_volume(server_parser) -> None:
    """No volume is shared between server pods: the init container unpacks the model store's
    archive into an emptyDir that the server reads as --model-repo."""
    pod = _server_pod()
    container = _server_container()
    repo = str(server_parser.parse_args(container["args"]).model_repo)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == repo]
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mount["name"]], "a pod-local copy, not a shared claim"
    (fetch,) = pod["initContainers"]
    (fetch_mount,) = fetch["volumeMounts"]
    assert (fetch_mount["name"], fetch_mount["mountPath"]) == (mount["name"], repo)
    assert not fetch_mount.get("readOnly")
    script = _fetch_script()
    compile(script, "fetch-models", "exec")  # the inline script is valid Python
    (url,) = re.findall(r'"(http://[^"]+)"', script)
    parsed = urlparse(url)
    store = k8s_one("Service", parsed.hostname)
    assert parsed.port in {p["port"] for p in store["spec"]["ports"]}
    assert f'extractall("{repo}"' in script
    archive = parsed.path.lstrip("/")
    # the store serves the claim the trainer writes, and the archive the script fetches
    store_pod = k8s_one("Deployment", parsed.hostname)["spec"]["template"]["spec"]
    assert store["spec"]["selector"].items() <= (
        k8s_one("Deployment", parsed.hostname)["spec"]["template"]["metadata"]["labels"].items()
    )
    (serve,) = store_pod["containers"]
    (served_dir,) = re.findall(r'directory="([^"]+)"', serve["args"][0])
    assert [m["mountPath"] for m in serve["volumeMounts"]] == [served_dir]
    trainer = k8s_one("Job")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert f"{served_dir}/{archive}" in trainer
    marker = serve["readinessProbe"]["httpGet"]["path"]
    written = f"> {served_dir}{marker}"
    assert trainer.rstrip("; }\n").endswith(written), "the marker is last"
    assert trainer.index(f"{served_dir}/{archive}") < trainer.index(written)


def test_model_store_answers_on_ipv4_and_ipv6_and_stops_on_sigterm(tmp_path) -> None:
    """The store container's own command, run here on a free port over a folder standing in
    for the claim. Server pods reach it through its Service, whose address is IPv6 on an
    IPv6 or IPv6-first cluster: `python -m http.server` listened on 0.0.0.0 only, so there
    the store never turned ready and every server pod's init container waited forever. As
    PID 1 a process with no SIGTERM handler ignores SIGTERM (the pod took its whole grace
    period to stop); exit status 0 shows the handler ran."""
    import signal
    import sys
    import time

    store = k8s_one("Deployment", "rnnserve-model-store")["spec"]["template"]["spec"]
    (container,) = store["containers"]
    (mount,) = container["volumeMounts"]
    (port,) = [p["containerPort"] for p in container["ports"]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    argv = [
        arg.replace(mount["mountPath"], str(tmp_path)).replace(str(port), str(free))
        for arg in container["command"] + container.get("args", [])
    ]
    assert argv[0] == "python"
    marker = container["readinessProbe"]["httpGet"]["path"]
    (tmp_path / marker.lstrip("/")).write_text("")
    proc = subprocess.Popen([sys.executable, *argv[1:]], stderr=subprocess.PIPE)
    try:
        hosts = ["127.0.0.1"] + (["[::1]"] if has_ipv6_loopback() else [])
        end = time.monotonic() + 30  # a bound on start-up, not a speed assertion
        while http_status(f"http://127.0.0.1:{free}{marker}") is None and time.monotonic() < end:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        for host in hosts:
            assert http_status(f"http://{host}:{free}{marker}") == 200, host
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "SIGTERM must stop the store itself"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run_trainer_job(tmp_path, generation: str | None) -> list[str]:
    """The trainer Job's own shell script over a folder standing in for the claim, with a
    stub `rnn-trainer` that writes what `rnn-trainer zoo` leaves in OUT for one model: its
    package (model.onnx, manifest.json) and torch checkpoint, plus a failed export's kept
    checkpoint and a killed publish's staging folder; returns the trainings it ran."""
    job = k8s_one("Job")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    if generation is not None:
        env["ZOO_GENERATION"] = generation
    claim = tmp_path / "claim"
    claim.mkdir(exist_ok=True)
    script = container["args"][0].replace("/models", str(claim))
    bin_dir, log = tmp_path / "bin", tmp_path / "trainings.log"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "rnn-trainer"
    stub.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\nout="$5"\nmkdir -p "$out/lstm/1"\n'
        f'echo "$ZOO_GENERATION" > "$out/lstm/1/model.onnx"\n'
        'echo "{}" > "$out/lstm/1/manifest.json"\n'
        'echo torch > "$out/lstm/1/checkpoint.pt"\n'
        'mkdir -p "$out/.unexported/gru/1" "$out/lstm/.1.tmp-x"\n'
        'echo torch > "$out/.unexported/gru/1/checkpoint.pt"\n'
        'echo half > "$out/lstm/.1.tmp-x/model.onnx"\n'
    )
    stub.chmod(0o755)
    environ = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(
        [*container["command"], script], env=environ, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_trainer_job_publishes_a_new_zoo_when_its_generation_changes(tmp_path) -> None:
    """The only pods that mount the claim are the store (read-only) and this Job, so the
    marker cannot be deleted by hand to retrain: the Job's ZOO_GENERATION says which zoo is
    wanted. A rerun with the same one trains nothing; a new one trains and publishes while
    the store keeps serving the old archive (it stays ready: new server pods still start)."""
    import tarfile

    (container,) = k8s_one("Job")["spec"]["template"]["spec"]["containers"]
    first = {e["name"]: e["value"] for e in container.get("env", [])}.get("ZOO_GENERATION", "1")
    claim = tmp_path / "claim"
    assert len(_run_trainer_job(tmp_path, None)) == 1, "a fresh claim: trains"
    assert (claim / ".zoo-complete").exists()
    assert len(_run_trainer_job(tmp_path, None)) == 1, "the same generation: nothing to do"
    (claim / ".zoo-complete").write_text("")  # what the Job wrote before generations
    assert len(_run_trainer_job(tmp_path, first)) == 1, "an old marker is the first generation"
    with tarfile.open(claim / "zoo.tar.gz") as archive:
        assert archive.extractfile("./lstm/1/model.onnx").read() == f"{first}\n".encode()
    assert len(_run_trainer_job(tmp_path, "2")) == 2, "a new generation: trains again"
    with tarfile.open(claim / "zoo.tar.gz") as archive:
        names = archive.getnames()
        model = archive.extractfile("./lstm/2/model.onnx").read()
    assert model == b"2\n", "the archive is the new zoo"
    # new weights under a new version number: a resume token made on a pod that still
    # serves the old zoo must not be continued on the new weights (see the Job's comment)
    assert "./lstm/1" not in names, names
    assert len(_run_trainer_job(tmp_path, "2")) == 2


def test_trainer_job_archives_only_what_the_server_reads(tmp_path) -> None:
    """Server pods unpack zoo.tar.gz and load NAME/VERSION/{manifest.json, model.onnx}; they
    never import torch. The checkpoints beside the packages (and a failed export's kept one
    in .unexported/) stay in the trainer's output on the claim, out of the archive."""
    import tarfile

    from rnnserve.artifact.manifest import MANIFEST_FILE, ONNX_FILE

    _run_trainer_job(tmp_path, "2")
    claim = tmp_path / "claim"
    with tarfile.open(claim / "zoo.tar.gz") as archive:
        files = {m.name for m in archive.getmembers() if m.isfile()}
        archive.extractall(tmp_path / "pod", filter="data")  # as the init container does
    assert files == {f"./lstm/2/{MANIFEST_FILE}", f"./lstm/2/{ONNX_FILE}"}, files
    assert (tmp_path / "pod" / "lstm" / "2" / ONNX_FILE).read_text() == "2\n"
    # the trainer's own output keeps them, for `rnn-trainer export` (docs/trainer.md)
    assert (claim / "zoo" / "lstm" / "2" / "checkpoint.pt").is_file()
    assert (claim / "zoo" / ".unexported" / "gru" / "1" / "checkpoint.pt").is_file()
    assert sorted(p.name for p in claim.iterdir()) == [".zoo-complete", "zoo", "zoo.tar.gz"]


def test_trainer_job_keeps_a_failed_exports_checkpoint_across_its_next_run(tmp_path) -> None:
    """A retried pod or a new generation starts from an empty zoo; a checkpoint a failed
    export kept (.unexported/) is moved out of the way first, not deleted with it."""
    _run_trainer_job(tmp_path, "2")
    _run_trainer_job(tmp_path, "3")
    claim = tmp_path / "claim"
    (kept,) = (claim / "kept").iterdir()
    assert (kept / "gru" / "1" / "checkpoint.pt").read_text() == "torch\n"
    assert (claim / "zoo" / ".unexported" / "gru" / "1" / "checkpoint.pt").is_file()


def test_trainer_job_refuses_a_generation_that_is_no_version_number(tmp_path) -> None:
    """ZOO_GENERATION becomes the models' version folder: a name that is not a whole number
    would be a folder the server skips (no version), so the Job stops before training."""
    for generation in ("next", "0", "02", ""):  # 0 is no version; 02 would be a second 2
        with pytest.raises(AssertionError, match="must be a whole number"):
            _run_trainer_job(tmp_path, generation)
    assert not (tmp_path / "trainings.log").exists()


def test_storage_works_on_a_read_write_once_default_class() -> None:
    claim = k8s_one("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in claim["spec"], "the cluster's default class"
    users = []
    for _, doc in k8s_docs():
        for pod in pod_specs(doc):
            claims = [
                v["persistentVolumeClaim"]["claimName"]
                for v in pod.get("volumes", [])
                if "persistentVolumeClaim" in v
            ]
            if claim["metadata"]["name"] in claims:
                users.append(doc)
    assert {d["kind"] for d in users} == {"Deployment", "Job"}
    (store,) = [d for d in users if d["kind"] == "Deployment"]
    assert store["spec"]["replicas"] == 1 and store["spec"]["strategy"]["type"] == "Recreate"
    job = k8s_one("Job")["spec"]["template"]["spec"]
    (term,) = job["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname", "the Job runs on the store's node"
    store_labels = store["spec"]["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= store_labels.items()


def test_server_pods_spread_across_nodes() -> None:
    deployment = k8s_one("Deployment", SERVER)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in _server_pod()["topologySpreadConstraints"]}
    host = spread["kubernetes.io/hostname"]
    assert host["maxSkew"] == 1
    assert host["labelSelector"]["matchLabels"].items() <= labels.items()
    assert host["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_env_names_are_real_flags_and_the_state_key_comes_from_a_secret(server_flags) -> None:
    env = {e["name"]: e for e in _server_container()["env"]}
    assert set(env) <= server_flags.env, set(env) - server_flags.env
    ref = env["RNNSERVE_STATE_KEY"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("rnnserve-state-key", "state-key")
    assert "value" not in env["RNNSERVE_STATE_KEY"], "never a literal key in the manifest"


def test_every_container_has_requests_limits_and_runs_as_non_root() -> None:
    pods = [pod for _, doc in k8s_docs() for pod in pod_specs(doc)]
    assert len(pods) == 3  # server, model store, trainer
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the images' user
        for c in pod.get("initContainers", []) + pod["containers"]:
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) & set(res["limits"]), c["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_services_select_the_pods_and_name_their_ports() -> None:
    deployment = k8s_one("Deployment", SERVER)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = _ports(_server_container())
    services = [
        d
        for _, d in k8s_docs()
        if d["kind"] == "Service" and d["metadata"]["name"] != "rnnserve-model-store"
    ]
    assert {s["metadata"]["name"] for s in services} == {"rnnserve", "rnnserve-headless"}
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        for port in svc["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"]
    assert k8s_one("Service", "rnnserve-headless")["spec"]["clusterIP"] == "None"


def test_hpa_and_pdb_target_the_deployment() -> None:
    deployment = k8s_one("Deployment", SERVER)
    hpa = k8s_one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    pdb = k8s_one("PodDisruptionBudget")["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"], "a drain must be able to evict a pod"


def test_the_hpa_alone_owns_the_replica_count() -> None:
    """With `spec.replicas` in the manifest every `kubectl apply -k` (a new image, a changed
    env) set the Deployment back to that count, so an HPA-scaled fleet lost its extra pods,
    and their streams, until the HPA scaled out again (Kubernetes' HPA docs say to drop it)."""
    deployment = k8s_one("Deployment", SERVER)
    assert "replicas" not in deployment["spec"]
    assert k8s_one("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2, "no single replica"


def test_scrape_annotations_and_service_monitor_point_at_the_metrics_port() -> None:
    pod = k8s_one("Deployment", SERVER)["spec"]["template"]
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


# -- Pod Security "restricted" -----------------------------------------------------------------
def _rendered_pods() -> list[tuple[str, dict]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", pod)
        for d in kustomize(K8S)
        for pod in pod_specs(d)
    ]


def test_every_rendered_pod_passes_pod_security_restricted() -> None:
    pods = _rendered_pods()
    assert {name for name, _ in pods} == {
        "Deployment/rnnserve-server", "Deployment/rnnserve-model-store", "Job/rnnserve-trainer",
    }  # fmt: skip
    for name, pod in pods:
        assert restricted_violations(pod) == [], name


@pytest.mark.parametrize(
    "break_it,control",
    [
        (lambda pod: pod["securityContext"].pop("seccompProfile"), "seccomp_restricted"),
        (lambda pod: pod["containers"][0]["securityContext"].pop("capabilities"),
         "restricted_capabilities"),
        (lambda pod: pod["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
         "privilege_escalation"),
        (lambda pod: pod["securityContext"].pop("runAsNonRoot"), "run_as_non_root"),
        (lambda pod: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
         "host_path_volumes"),
        (lambda pod: pod["containers"][0]["securityContext"].update(privileged=True), "privileged"),
        (lambda pod: pod.update(hostNetwork=True), "host_namespaces"),
    ],
)  # fmt: skip
def test_the_pod_security_check_catches_each_break(break_it, control: str) -> None:
    pod = copy.deepcopy(_server_pod())
    break_it(pod)
    assert any(v.startswith(f"{control}:") for v in restricted_violations(pod))


def test_kustomize_reimplementation_matches_kubectl() -> None:
    """The rendering the PSS test checks is what kubectl renders (where kubectl exists)."""
    kubectl = need("kubectl", "the kustomize rendering cannot be compared")
    for folder in (K8S, MONITORING):
        done = subprocess.run(
            [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0 and "unknown command" in done.stderr:
            missing("this kubectl has no kustomize")
        assert done.returncode == 0, done.stderr
        theirs = sorted(
            (d for d in yaml.safe_load_all(done.stdout) if d),
            key=lambda d: (d["kind"], d["metadata"]["name"]),
        )
        ours = sorted(kustomize(folder), key=lambda d: (d["kind"], d["metadata"]["name"]))
        assert ours == theirs, folder


# -- Prometheus Operator ----------------------------------------------------------------------
def _generator():
    path = MONITORING / "generate_prometheusrule.py"
    spec = importlib.util.spec_from_file_location("generate_prometheusrule", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheus_rule_is_generated_from_the_alerts_file() -> None:
    gen = _generator()
    committed = (MONITORING / "prometheusrule.yaml").read_text()
    assert committed == gen.render((DEPLOY / "alerts.yml").read_text()), (
        "stale: run python deploy/k8s/monitoring/generate_prometheusrule.py"
    )
    rule = yaml.safe_load(committed)
    alerts = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")


def test_the_generated_rule_detects_a_changed_alert() -> None:
    gen = _generator()
    alerts = (DEPLOY / "alerts.yml").read_text()
    changed = alerts.replace("for: 1m", "for: 2m", 1)
    assert changed != alerts
    assert gen.render(changed) != (MONITORING / "prometheusrule.yaml").read_text()


def test_monitoring_kustomization_labels_what_kube_prometheus_stack_selects() -> None:
    kust = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert set(kust["resources"]) == {"servicemonitor.yaml", "prometheusrule.yaml"}
    rendered = kustomize(MONITORING)
    assert {d["kind"] for d in rendered} == {"ServiceMonitor", "PrometheusRule"}
    for doc in rendered:
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack", doc["kind"]
        assert doc["metadata"]["namespace"] == kust["namespace"]
    monitor = next(d for d in rendered if d["kind"] == "ServiceMonitor")
    assert "release" not in monitor["spec"]["selector"]["matchLabels"], "labels, not selectors"


# -- Data-parallel training Job (deploy/k8s/distributed, applied on its own) -------------------
def test_distributed_training_job_is_valid_and_its_pods_find_each_other() -> None:
    """Schema-valid; torchrun's own parser and rnn-trainer's accept the command; the
    rendezvous host is pod 0's DNS name through the headless Service; the world divides the
    batch; the run dir (resume) and the package live on the claim every pod mounts."""
    import shlex

    from torch.distributed.run import get_args_parser

    from rnnserve.trainer.cli import build_parser

    kv = need_module("kubernetes_validate", "pip install kubernetes-validate")
    from kubernetes_validate.utils import latest_version

    path = K8S / "distributed" / "trainer-ddp.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}
    assert set(docs) == {"Service", "PersistentVolumeClaim", "Job"}
    for doc in docs.values():
        for version in (latest_version(), OLDEST_SUPPORTED):
            kv.validate(doc, version, strict=True)
    svc, claim, job = docs["Service"], docs["PersistentVolumeClaim"], docs["Job"]
    spec, template = job["spec"], job["spec"]["template"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert template["spec"]["subdomain"] == svc["metadata"]["name"]
    (container,) = template["spec"]["containers"]
    script = container["args"][0]
    flags = re.search(r'TRAIN="([^"]*)"', script).group(1)
    torchrun = script.split("exec torchrun", 1)[1].replace("$RESUME", "")
    argv = shlex.split("torchrun" + torchrun.replace("$TRAIN", flags))
    assert argv[0] == "torchrun"
    run = get_args_parser().parse_args(argv[1:])
    assert int(run.nnodes) == spec["completions"] and run.rdzv_backend == "c10d"
    host, port = run.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"  # pod 0's DNS name
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in container["ports"]}
    assert run.module and run.training_script == "rnnserve.trainer.cli"
    train = build_parser(run.training_script_args).parse_args(run.training_script_args)
    assert train.command == "train" and train.nproc == 1  # torchrun starts the ranks
    assert train.batch_size % (int(run.nnodes) * int(run.nproc_per_node)) == 0
    (mount,) = container["volumeMounts"]
    (volume,) = template["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on two nodes mount it"
    for written in (train.out, train.run_dir):
        assert written.startswith(mount["mountPath"] + "/"), written
    assert f'test -f {train.run_dir}/checkpoint.pt && RESUME="--resume {train.run_dir}"' in script
    assert f"cli ended {train.run_dir} --epochs {train.epochs};" in script  # the run's epochs
    assert restricted_violations(template["spec"]) == []


@pytest.mark.parametrize(
    "epochs_done, index, runs",
    [
        (None, "0", "torchrun"),  # a new run: both pods meet at the rendezvous
        (7, "1", "torchrun --resume"),  # a run cut mid-way: both resume together
        (20, "0", "python train --resume"),  # pod 0 lost during the export: alone, no peer
        (20, "1", ""),  # its peer finished long ago: nothing to do
    ],
)
def test_the_ddp_job_script_exports_an_ended_run_without_its_peer(
    tmp_path, epochs_done, index, runs
) -> None:
    """The Job's own shell script, run with torchrun and the trainer's `train` replaced by
    stubs that log their arguments; `rnn-trainer ended` is the real one."""
    import sys

    import torch

    path = K8S / "distributed" / "trainer-ddp.yaml"
    job = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = container["args"][0].replace("/runs/", f"{tmp_path}/runs/")
    run_dir = tmp_path / "runs" / "lstm-ddp"
    run_dir.mkdir(parents=True)
    if epochs_done is not None:
        history = [{"epoch": e, "val_ppl": 9.0} for e in range(1, epochs_done + 1)]
        checkpoint = {"state_dict": {}, "vocab": ["<unk>"], "model_config": {}, "epoch":
                      epochs_done, "history": history, "train_config": {"epochs": 20}}  # fmt: skip
        torch.save(checkpoint, run_dir / "checkpoint.pt")
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(f'#!/bin/sh\necho "torchrun $*" >> {log}\n')
    (bin_dir / "python").write_text(
        f'#!/bin/sh\nif [ "$3" = ended ]; then exec {sys.executable} "$@"; fi\n'
        f'echo "python $*" >> {log}\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "JOB_COMPLETION_INDEX": index}
    done = subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    if not runs:
        assert calls == []
        return
    (call,) = calls
    program, *rest = runs.split()
    assert call.startswith(program) and " train " in call
    assert (f"--resume {run_dir}" in call) == ("--resume" in rest)


def test_a_url_repository_has_a_writable_cache_under_the_read_only_root() -> None:
    """The server mirrors an http(s)/s3 --model-repo into the image's XDG_CACHE_HOME; with
    readOnlyRootFilesystem that path needs a volume, or switching to a URL fails at start."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    cache = re.search(r"XDG_CACHE_HOME=(\S+)", dockerfile).group(1)
    deployment = k8s_one("Deployment", SERVER)
    (server,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "server"]  # fmt: skip
    assert server["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert cache in mounts and not mounts[cache].get("readOnly")
