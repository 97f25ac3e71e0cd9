"""deploy/healthcheck.py (the images' HEALTHCHECK) against a real grpc.health.v1 servicer."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.unit.deploy.deployfiles import DEPLOY


def _load_script():
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load_script()


@pytest.fixture(scope="module")
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_exits_0(health_server, capsys) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([target]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_not_serving_exits_1(health_server, capsys) -> None:
    target, servicer = health_server
    servicer.set("rnnserve.v1.Inference", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([target, "rnnserve.v1.Inference"]) == 1
    assert "NOT_SERVING" in capsys.readouterr().out


def test_unknown_service_exits_1(health_server, capsys) -> None:
    target, _ = health_server
    assert healthcheck.main([target, "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().out


def test_unreachable_exits_1_with_a_reason(capsys) -> None:
    assert healthcheck.main([f"127.0.0.1:{_free_port()}"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().out


def test_default_target_follows_rnnserve_port(health_server, monkeypatch) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    monkeypatch.setenv("RNNSERVE_PORT", target.rsplit(":", 1)[1])
    assert healthcheck.main([]) == 0


@pytest.mark.parametrize("variable", ["http_proxy", "https_proxy", "grpc_proxy"])
def test_proxy_variables_do_not_reroute_the_check(health_server, monkeypatch, variable) -> None:
    """Docker injects its client's proxy settings into every container; gRPC honours them,
    so without opting out the check dialled localhost through the proxy and failed."""
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    monkeypatch.setenv(variable, f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("no_grpc_proxy", raising=False)
    assert healthcheck.main([target]) == 0


def test_bad_arguments_exit_2(capsys) -> None:
    assert healthcheck.main(["a", "b", "c"]) == 2
    assert "usage" in capsys.readouterr().err
