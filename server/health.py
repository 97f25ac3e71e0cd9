"""grpc.health.v1: overall ("" and rnnserve.v1.Inference), Admin, and one service per model.

Overall is SERVING only while some model version is SERVING (or --allow-empty-repo says an
empty repository is fine while bootstrapping): a server with nothing to serve must not pass
a readiness probe. A model name is SERVING while its default version (the one calls that name
no version reach) serves. A version serves while it is loaded SERVING, except (under
--decode-process 1) from a decode process failing to open it until one opens it: its new
streams are refused meanwhile, and Triton's or TGI's readiness would say so too. Admin is
SERVING whenever the process takes calls (it is how a repository gets fixed). Every refresh
(start, reload) re-evaluates, and `recheck` (once a second) follows the decode processes;
shutdown turns everything NOT_SERVING for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from rnnserve.server.repository import ModelVersion, Repository

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# KServe v2 gRPC (server/kserve) serves from the same engine: it is ready exactly when "" is.
OVERALL = ("", "rnnserve.v1.Inference", "inference.GRPCInferenceService")
ADMIN = "rnnserve.v1.Admin"


class EndingHealthServicer(health_aio.HealthServicer):
    """grpc's health servicer, whose Watch streams end once the server drains.

    Why: a Watch never ends by itself, so every open one (gRPC client-side health checking
    keeps one per channel) would hold a graceful stop for its whole --grace. Watchers have
    seen NOT_SERVING since SIGTERM; when calls are refused they are told OK and left."""

    def __init__(self) -> None:
        super().__init__()
        # grpc starts "" as SERVING: the port opens before the first refresh, and a probe in
        # between must not see a replica with nothing loaded (or only broken models) ready
        self._server_status[""] = NOT_SERVING
        self._ended = asyncio.Event()

    def end_watches(self) -> None:
        self._ended.set()

    async def Watch(self, request, context) -> None:
        if self._ended.is_set():  # the status once, then the end, as a drained server's
            unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            status = self._server_status.get(request.service, unknown)
            await context.write(health_pb2.HealthCheckResponse(status=status))
            return
        watch = asyncio.ensure_future(super().Watch(request, context))
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait({watch, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # the caller left (cancelled), or the drain ended it
            watch.cancel()
            ended.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if watch.done() and not watch.cancelled() and watch.exception() is not None:
            raise watch.exception()


class Decoder(Protocol):
    """What health reads of a version's decoder (server/decode/process.py's DecodeProcess;
    a DecodeLoop, without `cannot_open`, always counts as able)."""

    name: str
    model: object


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
        decoders: Callable[[], Iterable[Decoder]] | None = None,
        on_version: Callable[[ModelVersion, bool], None] | None = None,
    ) -> None:
        """`decoders`: the engine's decode loops now; `on_version(entry, serving)`: a loaded
        SERVING version turned unable to serve, or able again (rnnserve_model_serving)."""
        self.repository = repository
        self.allow_empty = allow_empty
        self.on_change = on_change
        self.decoders = decoders or (lambda: ())
        self.on_version = on_version
        self.servicer = EndingHealthServicer()
        self.ready = False
        self._known: set[str] = set()
        self._unable: dict[tuple[str, str], ModelVersion] = {}
        self._shut = False

    def serves(self, entry: ModelVersion) -> bool:
        """Whether this version serves as health last said: loaded SERVING and not one that
        no decode process can open. KServe ModelReady, GetModel/ListModels and /v1/models
        read it, so they never call SERVING what grpc.health.v1 calls NOT_SERVING."""
        return entry.serving and (entry.name, entry.version) not in self._unable

    def _cannot_open(self) -> dict[tuple[str, str], ModelVersion]:
        """Loaded versions whose decode process cannot open the model now."""
        found = {}
        for decoder in self.decoders():
            if not getattr(decoder, "cannot_open", False):
                continue
            for entry in self.repository.models.get(decoder.name, {}).values():
                if entry.model is decoder.model:
                    found[(entry.name, entry.version)] = entry
        return found

    async def recheck(self) -> None:
        """Follows the decode processes (the server calls it every second): retries those
        that could not open their model as their back-off allows, and refreshes when a
        version turned unable to serve or able again."""
        if self._shut:
            return
        for decoder in self.decoders():
            retry = getattr(decoder, "retry_open", None)
            if retry is not None and getattr(decoder, "cannot_open", False):
                try:  # a process that cannot be started: the next recheck tries again
                    retry()
                except Exception:  # the caller's loop must go on: it also writes metrics
                    log.exception("could not start a decode process of %s", decoder.name)
        if self._cannot_open().keys() != self._unable.keys():
            await self.refresh()

    async def refresh(self) -> None:
        if self._shut:
            return
        unable = self._cannot_open()
        if self.on_version is not None:
            for key in self._unable.keys() - unable.keys():
                entry = self._unable[key]
                if self.repository.models.get(entry.name, {}).get(entry.version) is entry:
                    self.on_version(entry, True)  # not unloaded (or reloaded) meanwhile
            for key in unable.keys() - self._unable.keys():
                self.on_version(unable[key], False)
        self._unable = unable
        names = set(self.repository.names())
        serving = set()
        for name in names:
            default = self.repository.default_version(name)
            if default is not None and (name, default.version) not in unable:
                serving.add(name)
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

    def end_watches(self) -> None:
        """Ends the open Watch streams (and answers later ones once): the server is
        draining, and they would hold its stop for the whole --grace."""
        self.servicer.end_watches()

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if self.on_change is not None:
            self.on_change(ready)
