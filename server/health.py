"""grpc.health.v1: overall ("" and rnnserve.v1.Inference), Admin, and one service per model.

Overall is SERVING only while some model version is SERVING (or --allow-empty-repo says an
empty repository is fine while bootstrapping): a server with nothing to serve must not pass
a readiness probe. A model name is SERVING while it has a serving version. Admin is SERVING
whenever the process takes calls (it is how a repository gets fixed). Every refresh (start,
reload) re-evaluates; shutdown turns everything NOT_SERVING for good.
"""

from __future__ import annotations

from collections.abc import Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from rnnserve.server.repository import Repository

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# KServe v2 gRPC (server/kserve) serves from the same engine: it is ready exactly when "" is.
OVERALL = ("", "rnnserve.v1.Inference", "inference.GRPCInferenceService")
ADMIN = "rnnserve.v1.Admin"


def overall_serving(any_model_serving: bool, allow_empty: bool, model_count: int) -> bool:
    """The overall verdict: a serving version, or an empty repository when allowed."""
    return any_model_serving or (allow_empty and model_count == 0)


class ModelHealth:
    """Owns the health servicer; `ready` mirrors the overall status for /readyz."""

    def __init__(
        self,
        repository: Repository,
        allow_empty: bool = False,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.repository = repository
        self.allow_empty = allow_empty
        self.on_change = on_change
        self.servicer = health_aio.HealthServicer()
        self.ready = False
        self._known: set[str] = set()
        self._shut = False

    async def refresh(self) -> None:
        if self._shut:
            return
        names = set(self.repository.names())
        serving = {n for n in names if self.repository.default_version(n) is not None}
        for name in names:
            await self.servicer.set(name, SERVING if name in serving else NOT_SERVING)
        for gone in self._known - names:
            await self.servicer.set(gone, NOT_SERVING)
        self._known = names
        ready = overall_serving(bool(serving), self.allow_empty, len(names))
        for name in OVERALL:
            await self.servicer.set(name, SERVING if ready else NOT_SERVING)
        await self.servicer.set(ADMIN, SERVING)
        self._set_ready(ready)

    async def shutdown(self) -> None:
        self._shut = True
        self._set_ready(False)
        await self.servicer.enter_graceful_shutdown()

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if self.on_change is not None:
            self.on_change(ready)
