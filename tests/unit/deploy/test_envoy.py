"""deploy/envoy/envoy.yaml parsed into Envoy's own Bootstrap protobuf (xds-protos), so a
misspelled or misplaced field fails here rather than at `docker compose up`; then the gRPC
load-balancing essentials are checked on the typed config."""

from __future__ import annotations

import importlib

import pytest
import yaml

from tests.unit.deploy.deployfiles import DEPLOY

# Types the config names in "@type": importing them registers them for Any resolution.
TYPED_CONFIG_MODULES = (
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
)


@pytest.fixture(scope="module")
def parse():
    pytest.importorskip("envoy.config.bootstrap.v3.bootstrap_pb2", reason="pip install xds-protos")
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
    assert len(bootstrap.static_resources.clusters) == 1


def test_typo_inside_a_typed_config_is_rejected(parse) -> None:
    from google.protobuf import json_format

    config = _config()
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["stat_prefx"] = "x"
    with pytest.raises(json_format.ParseError):
        parse(config)


def test_cluster_is_http2_round_robin_with_grpc_health_checks(parse) -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

    (cluster,) = parse(_config()).static_resources.clusters
    assert cluster.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS, "re-resolves scaled replicas"
    options = http_protocol_options_pb2.HttpProtocolOptions()
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options"), "gRPC needs h2"
    (check,) = cluster.health_checks
    assert check.HasField("grpc_health_check")


def test_routes_do_not_cut_long_streams(parse) -> None:
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    (listener,) = parse(_config()).static_resources.listeners
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    (route,) = hcm.route_config.virtual_hosts[0].routes
    assert route.route.cluster == "rnnserve"
    assert route.route.timeout.ToSeconds() == 0, "0 = no per-request timeout (streams)"
    assert hcm.stream_idle_timeout.ToSeconds() == 0
