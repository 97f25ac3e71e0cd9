"""grpc.health.v1: overall ("" and rnnserve.v1.Inference) plus one service name per model.

A model name is SERVING while it has a serving version; shutdown turns everything NOT_SERVING.
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from rnnserve.server.repository import Repository

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "rnnserve.v1.Inference", "rnnserve.v1.Admin")


class ModelHealth:
    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self.servicer = health_aio.HealthServicer()
        self._known: set[str] = set()

    async def refresh(self) -> None:
        for name in SERVICES:
            await self.servicer.set(name, SERVING)
        names = set(self.repository.names())
        for name in names:
            ok = self.repository.default_version(name) is not None
            await self.servicer.set(name, SERVING if ok else NOT_SERVING)
        for gone in self._known - names:
            await self.servicer.set(gone, NOT_SERVING)
        self._known = names

    async def shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()
