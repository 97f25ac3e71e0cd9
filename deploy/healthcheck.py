"""Container health check: exit 0 when the rnn-server answers grpc.health.v1 with SERVING.

Used by the Dockerfile HEALTHCHECK and the compose healthchecks, so a container is healthy
exactly when a gRPC client (or Envoy's active health check) would find it serving. No
grpc_health_probe binary is needed: grpcio-health-checking is already a server dependency.

Usage: python healthcheck.py [HOST:PORT] [SERVICE]
  HOST:PORT defaults to localhost:$RNNSERVE_PORT (50051); SERVICE defaults to "" (the whole
  server). Exit codes: 0 serving, 1 not serving or unreachable, 2 bad arguments.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0
# Docker passes its client's proxy settings (http_proxy, https_proxy) into every container and
# gRPC honours them, so a check of the container's own port would go through the proxy and fail.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]
USAGE = "usage: python healthcheck.py [HOST:PORT] [SERVICE]"


def check(target: str, service: str = "", timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """Asks `target` for the health of `service`; returns (serving, one-line reason)."""
    try:
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"{target}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 2 or any(a in ("-h", "--help") for a in args):
        print(USAGE, file=sys.stderr)
        return 2
    target = args[0] if args else f"localhost:{os.environ.get('RNNSERVE_PORT', '50051')}"
    service = args[1] if len(args) > 1 else ""
    ok, reason = check(target, service)
    print(reason)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
