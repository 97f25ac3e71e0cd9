"""deploy/docker-compose.yml: parsed, and consistent with the Dockerfiles, the server's flags,
Prometheus, Grafana and Envoy (no Docker engine here, so these checks stand in for `up`)."""

from __future__ import annotations

import shlex

import pytest
import yaml

from rnnserve.server.settings import Settings
from tests.unit.deploy.deployfiles import (
    DEPLOY,
    dockerfile_stages,
    exec_form,
    healthcheck_cmd,
    interpolate,
    k8s_one,
    load_compose,
)

SERVING = ("server", "replica")


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def _volume_targets(service: dict) -> dict[str, tuple[str, str]]:
    """{container path: (source, mode)} of a service's short-syntax volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


def test_services_and_profiles(compose: dict) -> None:
    services = compose["services"]
    assert {"trainer", "server", "prometheus", "grafana", "replica", "envoy"} <= set(services)
    default = {n for n, s in services.items() if not s.get("profiles")}
    assert default == {"trainer", "server", "prometheus", "grafana"}
    assert services["replica"]["profiles"] == ["scale"] == services["envoy"]["profiles"]
    assert int(services["replica"]["deploy"]["replicas"]) >= 2


def test_interpolation_takes_the_environment(compose: dict) -> None:
    scaled = load_compose({"RNNSERVE_REPLICAS": "5", "RNNSERVE_STATE_KEY": "k"})
    assert scaled["services"]["replica"]["deploy"]["replicas"] == "5"
    assert scaled["services"]["replica"]["environment"]["RNNSERVE_STATE_KEY"] == "k"
    assert interpolate("${A:-x}-${B}", {"B": "y"}) == "x-y"


def test_images_are_built_from_the_deploy_dockerfiles(compose: dict) -> None:
    services = compose["services"]
    expected = {"trainer": "Dockerfile.trainer", "server": "Dockerfile", "replica": "Dockerfile"}
    for name, dockerfile in expected.items():
        build = services[name]["build"]
        assert build["context"] == ".."
        assert build["dockerfile"] == f"deploy/{dockerfile}"
        assert (DEPLOY / dockerfile).exists()
    assert services["server"]["image"] == services["replica"]["image"]


def test_images_match_kubernetes(compose: dict) -> None:
    deployment = k8s_one("Deployment", "rnnserve-server")["spec"]["template"]["spec"]
    job = k8s_one("Job")["spec"]["template"]["spec"]
    assert deployment["containers"][0]["image"] == compose["services"]["server"]["image"]
    assert job["containers"][0]["image"] == compose["services"]["trainer"]["image"]


def test_server_waits_for_the_trainer_job(compose: dict) -> None:
    for name in SERVING:
        dep = compose["services"][name]["depends_on"]["trainer"]
        assert dep["condition"] == "service_completed_successfully"
    assert compose["services"]["trainer"]["restart"] == "no"


def test_trainer_and_server_share_the_model_volume(compose: dict, server_flags) -> None:
    services = compose["services"]
    trainer = _volume_targets(services["trainer"])
    assert trainer["/models"] == ("models", "rw")
    argv = services["trainer"]["command"][0]
    assert "rnn-trainer zoo --preset default --out /models &&" in argv
    job = k8s_one("Job")["spec"]["template"]["spec"]["containers"][0]
    # k8s trains the same zoo into a subfolder it then archives for the model store
    assert _trainer_argv(job["args"][0]) == [
        w.replace("/models", "/models/zoo") for w in _trainer_argv(argv)
    ], "compose and k8s train the same way"
    for name in SERVING:
        env = services[name]["environment"]
        assert _volume_targets(services[name])["/models"] == ("models", "ro")
        assert env["RNNSERVE_MODEL_REPO"] == "/models"
        assert set(env) <= server_flags.env, set(env) - server_flags.env
    assert "models" in compose["volumes"]


def test_ports_match_the_server_defaults_and_expose(compose: dict, server_parser) -> None:
    defaults = server_parser.parse_args([])
    env = compose["services"]["server"]["environment"]
    assert int(env["RNNSERVE_PORT"]) == defaults.port == 50051
    assert int(env["RNNSERVE_METRICS_PORT"]) == defaults.metrics_port == 8000
    published = {int(p.split(":")[-1]) for p in compose["services"]["server"]["ports"]}
    final = dockerfile_stages(DEPLOY / "Dockerfile")[-1]
    exposed = {int(p) for a in final.args("EXPOSE") for p in a.split()}
    assert int(env["RNNSERVE_HTTP_PORT"]) == Settings().http_port == 8080
    assert published == exposed == {50051, 8000, 8080}
    assert "ports" not in compose["services"]["replica"], "replicas are reached through Envoy"


def test_healthcheck_is_the_images_grpc_health_check(compose: dict) -> None:
    final = dockerfile_stages(DEPLOY / "Dockerfile")[-1]
    for name in SERVING:
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1:] == healthcheck_cmd(final)


@pytest.mark.parametrize("name", [*SERVING, "trainer"])
def test_containers_run_under_an_init_that_forwards_sigterm(compose: dict, name: str) -> None:
    """PID 1 ignores every signal it has no handler for: rnn-server installs its SIGTERM
    handler only once its imports are done (sh never does), so a `docker compose stop` that
    early, or during training, was lost and the container sat out the grace period until
    SIGKILL."""
    assert compose["services"][name].get("init") is True, name


def test_stop_grace_period_outlasts_the_servers_own_shutdown(compose: dict, server_parser) -> None:
    """`docker compose stop` SIGKILLs after stop_grace_period: it must cover the drain delay,
    --grace for in-flight streams and the trace flush."""
    from rnnserve.server.tracing import FLUSH_TIMEOUT_S

    defaults = server_parser.parse_args([])
    for name in SERVING:
        service = compose["services"][name]
        env = service["environment"]
        drain = float(env.get("RNNSERVE_DRAIN_DELAY", defaults.drain_delay))
        grace = float(env.get("RNNSERVE_GRACE", defaults.grace))
        assert service["stop_grace_period"].endswith("s"), service["stop_grace_period"]
        assert float(service["stop_grace_period"][:-1]) > drain + grace + FLUSH_TIMEOUT_S, name


def test_replicas_share_the_resume_token_key(compose: dict) -> None:
    raw = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    keys = {raw["services"][n]["environment"]["RNNSERVE_STATE_KEY"] for n in SERVING}
    assert keys == {"${RNNSERVE_STATE_KEY:-}"}, "every replica signs with the same key"


def test_prometheus_finds_every_serving_container(compose: dict) -> None:
    services = compose["services"]
    aliases = [set(services[n]["networks"]["default"]["aliases"]) for n in SERVING]
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "rnnserve"]
    (sd,) = job["dns_sd_configs"]
    assert all(set(sd["names"]) <= a for a in aliases)
    assert sd["port"] == int(services["server"]["environment"]["RNNSERVE_METRICS_PORT"])
    mounts = _volume_targets(services["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == ("./prometheus.yml", "ro")
    for rule_file in prom["rule_files"]:
        source, _ = mounts[f"/etc/prometheus/{rule_file}"]
        assert (DEPLOY / source).exists()
    command = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command


def test_grafana_mounts_the_provisioning_and_dashboards(compose: dict) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _volume_targets(grafana)
    provisioning, _ = mounts["/etc/grafana/provisioning"]
    assert (DEPLOY / provisioning / "datasources").is_dir()
    provider = yaml.safe_load((DEPLOY / provisioning / "dashboards" / "rnnserve.yml").read_text())[
        "providers"
    ][0]
    dash_source, _ = mounts[provider["options"]["path"]]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DEPLOY / dash_source / home.rsplit("/", 1)[1]).exists()
    datasource = yaml.safe_load(
        (DEPLOY / provisioning / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    prom_port = {p.split(":")[-1] for p in compose["services"]["prometheus"]["ports"]}
    assert datasource["url"] == f"http://prometheus:{prom_port.pop()}"


def test_envoy_balances_the_replicas(compose: dict) -> None:
    envoy = compose["services"]["envoy"]
    mounts = _volume_targets(envoy)
    source, _ = mounts["/etc/envoy/envoy.yaml"]
    assert envoy["command"][:3] == ["envoy", "-c", "/etc/envoy/envoy.yaml"]
    config = yaml.safe_load((DEPLOY / source).read_text())
    cluster, http = config["static_resources"]["clusters"]
    (endpoints,) = cluster["load_assignment"]["endpoints"]
    addresses = {
        (e["endpoint"]["address"]["socket_address"]["address"],
         e["endpoint"]["address"]["socket_address"]["port_value"])
        for e in endpoints["lb_endpoints"]
    }  # fmt: skip
    port = int(compose["services"]["replica"]["environment"]["RNNSERVE_PORT"])
    assert addresses == {("replica", port)}
    (http_endpoints,) = http["load_assignment"]["endpoints"]
    (http_endpoint,) = http_endpoints["lb_endpoints"]
    http_port = int(compose["services"]["replica"]["environment"]["RNNSERVE_HTTP_PORT"])
    assert http_endpoint["endpoint"]["address"]["socket_address"]["port_value"] == http_port
    (listener,) = config["static_resources"]["listeners"]
    listen = listener["address"]["socket_address"]["port_value"]
    published = {p.rsplit(":", 1)[-1]: p for p in envoy["ports"]}
    assert str(listen) in published
    assert envoy["depends_on"]["replica"]["condition"] == "service_healthy"


def _trainer_argv(shell_command: str) -> list[str]:
    """The `rnn-trainer ...` argv inside `test -f marker || { rnn-trainer ... && touch ...; }`."""
    words = shlex.split(shell_command.replace("\\\n", " "))  # the shell's line continuations
    start = words.index("rnn-trainer")
    return words[start + 1 : words.index("&&", start)]


@pytest.mark.parametrize("preset", [None, "tiny"])
def test_trainer_commands_parse_with_the_real_cli(preset: str | None) -> None:
    from rnnserve.trainer.cli import build_parser

    env = {"RNNSERVE_ZOO_PRESET": preset} if preset else {}
    compose = load_compose(env)["services"]["trainer"]["command"][0]
    job = k8s_one("Job")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    image = dockerfile_stages(DEPLOY / "Dockerfile.trainer")[-1]
    image_argv = exec_form(image.args("CMD")[-1])
    for argv, out in (
        (_trainer_argv(compose), "/models"),
        (_trainer_argv(job), "/models/zoo"),  # archived from there for the model store
        (image_argv, "/models"),
    ):
        args = build_parser(argv).parse_args(argv)
        assert (args.command, args.out) == ("zoo", out)
    assert build_parser().parse_args(_trainer_argv(compose)).preset == (preset or "default")


def test_admin_ports_listen_on_loopback_only() -> None:
    """Prometheus (its lifecycle API can shut it down), Grafana (an admin login) and Envoy's
    admin page are published on 127.0.0.1, not on every host interface."""
    services = load_compose()["services"]
    for name, port in (("prometheus", 9090), ("grafana", 3000), ("envoy", 9901)):
        published = [str(p) for p in services[name]["ports"] if str(p).endswith(f":{port}")]
        assert published and all(p.startswith("127.0.0.1:") for p in published), (name, published)
