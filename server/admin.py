"""Admin.ReloadModels: rescan the repository; removed versions unload once their streams end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from rnnserve.server.engine import Engine
from rnnserve.server.health import ModelHealth
from rnnserve.server.settings import WORKERS_PARENT_ENV
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, engine: Engine, health: ModelHealth) -> None:
        self.engine = engine
        self.health = health
        self._lock = asyncio.Lock()

    async def ReloadModels(self, request, context):
        async with self._lock:
            report = await reload(self.engine, self.health)
        parent = os.environ.get(WORKERS_PARENT_ENV)
        if parent and context is not None:  # a call, not SIGHUP: the other workers rescan too
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(parent), signal.SIGHUP)  # the parent sends it to every worker
        return pb.ReloadModelsResponse(
            loaded=report.loaded, unloaded=report.unloaded, failed=report.failed
        )


async def reload(engine: Engine, health: ModelHealth):
    """Rescans; unloads vanished versions: they take no new call at once, and their decode
    loops close once the streams already running have ended. Returns the report.

    Sessions are built in a worker thread (a large model takes a while to load), so live
    streams keep their pace; only publishing the new versions runs on the event loop.
    """
    repository = engine.repository
    report = repository.install(*await asyncio.to_thread(repository.load_new))
    retired = []
    for tag in report.unloaded:  # no await here: no call can slip in between
        name, version = tag.rsplit("/", 1)
        repository.remove(name, version)  # first, so a new call cannot reach it (NOT_FOUND)
        retired.append(engine.pop_decoder(name, version))
        engine.metrics.forget_version(name, version)
    await health.refresh()
    for decoder in retired:  # the streams already running finish on their own loop
        if decoder is not None:
            await decoder.drain()
            await decoder.close()
    changed = report.loaded or report.unloaded or report.failed
    log.log(
        logging.INFO if changed else logging.DEBUG,
        "repository rescanned",
        extra={"loaded": report.loaded, "unloaded": report.unloaded, "failed": report.failed},
    )
    return report
