"""deploy/envoy/envoy.yaml parsed into Envoy's own Bootstrap protobuf (xds-protos), so a
misspelled or misplaced field fails here rather than at `docker compose up`; then the gRPC
load-balancing essentials are checked on the typed config."""

from __future__ import annotations

import importlib
import re

import pytest
import yaml

from tests.tools import need_module
from tests.unit.deploy.deployfiles import DEPLOY

# Types the config names in "@type": importing them registers them for Any resolution.
TYPED_CONFIG_MODULES = (
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
)


@pytest.fixture(scope="module")
def parse():
    need_module("envoy.config.bootstrap.v3.bootstrap_pb2", "pip install xds-protos")
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from google.protobuf import json_format

    for name in TYPED_CONFIG_MODULES:
        importlib.import_module(name)

    def _parse(config: dict):
        return json_format.ParseDict(config, bootstrap_pb2.Bootstrap())

    return _parse


def _config() -> dict:
    return yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())


def test_config_parses_as_envoy_bootstrap(parse) -> None:
    bootstrap = parse(_config())
    assert len(bootstrap.static_resources.listeners) == 1
    names = [c.name for c in bootstrap.static_resources.clusters]
    assert names == ["rnnserve", "rnnserve-http"], "gRPC, and the replicas' --http-port"


def test_typo_inside_a_typed_config_is_rejected(parse) -> None:
    from google.protobuf import json_format

    config = _config()
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["stat_prefx"] = "x"
    with pytest.raises(json_format.ParseError):
        parse(config)


def test_cluster_is_http2_least_request_with_grpc_health_checks(parse) -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

    cluster = parse(_config()).static_resources.clusters[0]
    assert cluster.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST, "long streams: fewest active"
    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS, "re-resolves scaled replicas"
    options = http_protocol_options_pb2.HttpProtocolOptions()
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options"), "gRPC needs h2"
    (check,) = cluster.health_checks
    assert check.HasField("grpc_health_check")


def test_health_checks_drop_a_draining_replica_within_its_drain_delay(parse) -> None:
    """compose gives replicas RNNSERVE_DRAIN_DELAY so that Envoy's health checks mark a
    stopping replica unhealthy before it refuses calls: `unhealthy_threshold` failed checks,
    one `interval` apart. Envoy uses `no_traffic_interval` instead (60 s when left out) until
    the cluster has carried a request, so it must not be longer either."""
    from google.protobuf import duration_pb2

    from tests.unit.deploy.deployfiles import load_compose

    env = load_compose()["services"]["replica"]["environment"]
    drain = float(env["RNNSERVE_DRAIN_DELAY"])
    envoy_default_no_traffic = duration_pb2.Duration(seconds=60)
    for cluster in parse(_config()).static_resources.clusters:
        (check,) = cluster.health_checks
        no_traffic = (
            check.no_traffic_interval
            if check.HasField("no_traffic_interval")
            else envoy_default_no_traffic
        )
        slowest = max(check.interval.ToTimedelta(), no_traffic.ToTimedelta()).total_seconds()
        noticed = check.unhealthy_threshold.value * slowest + check.timeout.ToTimedelta().seconds
        assert noticed <= drain, (cluster.name, noticed, drain)


def _routes(parse):
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    (listener,) = parse(_config()).static_resources.listeners
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm, list(hcm.route_config.virtual_hosts[0].routes)


def test_routes_do_not_cut_long_streams(parse) -> None:
    """Each timeout set to 0 (off): a field left out reads as 0 here too, but Envoy then
    applies its default, 15 s per route and 5 min of stream idleness, and cuts streams."""
    hcm, routes = _routes(parse)
    assert routes, "no routes: the loop below would check nothing"
    for route in routes:
        # OpenAI and KServe REST, vLLM's /health, /version, /tokenize, /detokenize
        http = route.match.prefix in ("/v1/", "/v2") or route.match.HasField("safe_regex")
        assert route.route.cluster == ("rnnserve-http" if http else "rnnserve")
        assert route.route.HasField("timeout"), f"{route.match}: Envoy's default is 15 s"
        assert route.route.timeout.ToSeconds() == 0, "0 = no per-request timeout (streams)"
    assert hcm.HasField("stream_idle_timeout"), "Envoy's default is 5 min"
    assert hcm.stream_idle_timeout.ToSeconds() == 0


def _route_for(routes, path: str):
    """The first route Envoy matches for a request path (path or prefix matches)."""
    for route in routes:
        kind = route.match.WhichOneof("path_specifier")
        if (
            (kind == "path" and path == route.match.path)
            or (kind == "prefix" and path.startswith(route.match.prefix))
            or (kind == "safe_regex" and re.fullmatch(route.match.safe_regex.regex, path))
        ):
            return route
    raise AssertionError(f"no route for {path}")


def _methods() -> list[tuple[str, bool]]:
    """(path, streaming) of every rnnserve.v1 RPC, from the compiled proto."""
    from rnnserve.v1 import rnnserve_pb2

    return [
        (f"/{svc.full_name}/{m.name}", m.client_streaming or m.server_streaming)
        for svc in rnnserve_pb2.DESCRIPTOR.services_by_name.values()
        for m in svc.methods
    ]


def test_unary_rpcs_retry_unavailable_streams_only_before_they_were_sent(parse) -> None:
    _, routes = _routes(parse)
    methods = _methods()
    assert any(streaming for _, streaming in methods) and any(not s for _, s in methods)
    for path, streaming in methods:
        route = _route_for(routes, path)
        policy = route.route.retry_policy
        if streaming:
            # retried only when none of it reached a replica: no token can have been sent
            retry_on = set(policy.retry_on.split(","))
            assert "connect-failure" in retry_on, f"{path}: a refused connection is final"
            assert retry_on <= RETRY_BEFORE_SENT, f"{path}: {retry_on - RETRY_BEFORE_SENT} replays"
            assert not policy.retriable_status_codes and not policy.retriable_headers, path
            continue
        assert "unavailable" in policy.retry_on.split(","), path
        assert policy.num_retries.value >= 1
        assert [p.name for p in policy.retry_host_predicate] == [
            "envoy.retry_host_predicates.previous_hosts"
        ], "retry on a replica not tried yet"
    # health checks and reflection (a bidirectional stream) are not retried either
    for path in ("/grpc.health.v1.Health/Check", "/grpc.reflection.v1alpha.ServerReflection/X"):
        assert not _route_for(routes, path).route.HasField("retry_policy"), path


def test_outlier_detection_ejects_a_failing_replica(parse) -> None:
    """Connection failures eject; replies do not: Envoy maps grpc-status to HTTP codes for
    outlier detection, so DEADLINE_EXCEEDED from a client's deadline is a 504, and counting
    replies would eject a healthy replica whose clients use deadlines."""
    cluster = parse(_config()).static_resources.clusters[0]
    assert cluster.HasField("outlier_detection")
    od = cluster.outlier_detection
    assert od.split_external_local_origin_errors
    assert od.consecutive_local_origin_failure.value >= 3
    assert od.enforcing_consecutive_local_origin_failure.value == 100
    for reply_rule in ("enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure",
                       "enforcing_success_rate"):  # fmt: skip
        assert od.HasField(reply_rule) and getattr(od, reply_rule).value == 0, reply_rule
    assert od.base_ejection_time.ToSeconds() > 0
    assert 0 < od.max_ejection_percent.value < 100, "never eject every replica"
    _, routes = _routes(parse)
    generate = _route_for(routes, "/rnnserve.v1.Inference/Generate")
    assert not generate.route.HasField("max_stream_duration"), "the deadline is not Envoy's"


def test_envoy_admin_stats_are_scraped_by_the_compose_prometheus(parse) -> None:
    from tests.unit.deploy.deployfiles import load_compose

    bootstrap = parse(_config())
    admin_port = bootstrap.admin.address.socket_address.port_value
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "envoy"]
    assert job["metrics_path"] == "/stats/prometheus"
    (sd,) = job["dns_sd_configs"]
    assert sd["port"] == admin_port
    services = load_compose()["services"]
    (name,) = sd["names"]
    assert name in services and "envoy" in services[name]["image"]


# retry_on values that fire only when no byte of the request reached a replica (Envoy's
# router filter docs, x-envoy-retry-on): a refused or failed connection, an HTTP/2
# REFUSED_STREAM, a reset before the request was sent (`reset-before-request`, new in 1.31.0).
# `5xx`, `reset`, `gateway-error`, status codes and headers fire after it was sent.
RETRY_BEFORE_SENT = {"connect-failure", "refused-stream", "reset-before-request"}
RETRY_BEFORE_SENT_SINCE = (1, 31)  # the Envoy release that added reset-before-request


def _envoy_release() -> tuple[int, int]:
    """(major, minor) of the Envoy image compose runs this config with."""
    from tests.unit.deploy.deployfiles import load_compose

    image = load_compose()["services"]["envoy"]["image"]
    found = re.fullmatch(r"envoyproxy/envoy:v(\d+)\.(\d+)\.\d+", image)
    assert found, f"{image}: pin a release (envoyproxy/envoy:vX.Y.Z)"
    return int(found.group(1)), int(found.group(2))


def test_http_routes_retry_on_another_replica_only_before_the_request_was_sent(parse) -> None:
    """A replica that is draining or just died refuses connections: an OpenAI or KServe REST
    request is then retried on another replica, as the unary gRPC calls are. A completion is
    not idempotent, so only failures before any of it reached a replica are retried."""
    _, routes = _routes(parse)
    unary = next(path for path, streaming in _methods() if not streaming)
    grpc_policy = _route_for(routes, unary).route.retry_policy
    http_routes = [r for r in routes if r.route.cluster == "rnnserve-http"]
    for path in ("/v1/completions", "/v1/models", "/v2/models/lstm/infer", "/v2/health/ready",
                 "/tokenize", "/detokenize", "/version", "/health"):  # fmt: skip
        assert _route_for(routes, path) in http_routes, path
    assert _envoy_release() >= RETRY_BEFORE_SENT_SINCE, "older Envoy rejects reset-before-request"
    for route in http_routes:
        where = route.match.prefix or route.match.path or route.match.safe_regex.regex
        assert route.route.HasField("retry_policy"), f"{where}: a refused connection is final"
        policy = route.route.retry_policy
        retry_on = set(policy.retry_on.split(","))
        assert {"connect-failure", "reset-before-request"} <= retry_on, where
        assert retry_on <= RETRY_BEFORE_SENT, f"{where}: {retry_on - RETRY_BEFORE_SENT} replays"
        assert not policy.retriable_status_codes and not policy.retriable_headers, where
        # a per-try timeout would cut a completion answered without streaming (its headers
        # come once it is done); the gRPC routes set none either
        assert not policy.HasField("per_try_timeout"), where
        assert policy.num_retries.value == grpc_policy.num_retries.value >= 1, where
        assert policy.host_selection_retry_max_attempts == (
            grpc_policy.host_selection_retry_max_attempts
        ), where
        assert [p.name for p in policy.retry_host_predicate] == [
            "envoy.retry_host_predicates.previous_hosts"
        ], f"{where}: retry on a replica not tried yet"


def test_clusters_allow_as_many_concurrent_retries_as_requests(parse) -> None:
    """Envoy lets a cluster run 3 retries at a time by default: when a replica dies under
    load, every retry beyond the third would fail at once instead of going elsewhere."""
    _, routes = _routes(parse)
    retried = {r.route.cluster for r in routes if r.route.HasField("retry_policy")}
    assert retried == {"rnnserve", "rnnserve-http"}
    for cluster in parse(_config()).static_resources.clusters:
        if cluster.name in retried:
            (limits,) = cluster.circuit_breakers.thresholds
            assert limits.max_retries.value >= limits.max_requests.value, cluster.name
