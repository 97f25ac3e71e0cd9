"""Admin.ReloadModels: rescan the repository; removed versions unload once their streams end."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from rnnserve.server.decode.loop import DecodeLoop
from rnnserve.server.decode.process import DecodeProcess
from rnnserve.server.engine import Engine
from rnnserve.server.health import ModelHealth
from rnnserve.server.repository import ReloadReport
from rnnserve.server.settings import WORKERS_PARENT_ENV
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Retired = list[DecodeLoop | DecodeProcess]
T = TypeVar("T")
RESCAN_THREAD = "rescan"  # the name of in_daemon_thread's threads


def abandoned_rescans() -> int:
    """Rescan threads still running (at exit: abandoned)."""
    return sum(t.name == RESCAN_THREAD and t.is_alive() for t in threading.enumerate())


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, engine: Engine, health: ModelHealth) -> None:
        self.engine = engine
        self.health = health
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self._unclosed: set[DecodeLoop | DecodeProcess] = set()  # removed, not closed yet

    async def ReloadModels(self, request, context):
        report, retiring = await self.rescan()
        parent = os.environ.get(WORKERS_PARENT_ENV)
        if parent and context is not None:  # a call, not SIGHUP: the other workers rescan too
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(parent), signal.SIGHUP)  # the parent sends it to every worker
        await asyncio.shield(retiring)  # the reply says the removed versions are unloaded
        return pb.ReloadModelsResponse(
            loaded=report.loaded,
            unloaded=report.unloaded,
            failed=[*report.failed, *report.sync_failed],  # a URL repository's sync too
        )

    async def rescan(self) -> tuple[ReloadReport, asyncio.Task]:
        """One rescan at a time (RPC, SIGHUP, poll). Returns the report and the task that
        closes the decode loops of removed versions once their streams end: a task of its
        own, outside the lock, so a long stream on a removed version holds up no later
        rescan, and a caller that stops waiting (a deadline) leaves no decode loop open.

        The rescan is a task of its own too, shielded from its caller: a deadline that
        passes while a large model loads (or downloads) must not throw the loaded model
        away, nor free the lock while the abandoned load still runs in its thread."""
        task = asyncio.ensure_future(self._rescan())
        self._retiring.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._retiring.discard)
        return await asyncio.shield(task)

    async def _rescan(self) -> tuple[ReloadReport, asyncio.Task]:
        async with self._lock:
            report, retired = await rescan(self.engine, self.health)
        self._unclosed.update(retired)
        task = asyncio.ensure_future(retire(retired, self._unclosed.discard))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return report, task

    async def close(self) -> None:
        """Shutdown, after the drain: closes the decode loops of removed versions that are
        still waiting for their streams to end. The server's own list no longer has them, and
        a decode thread left stepping when the process exits aborts it (SIGABRT, exit 134)."""
        for decoder in list(self._unclosed):
            try:
                await decoder.close()
            except Exception:  # the others still close
                log.exception("closing the decode loop of a removed model version failed")
            self._unclosed.discard(decoder)


async def in_daemon_thread(fn: Callable[[], T]) -> T:
    """asyncio.to_thread, in a thread that does not hold the process's exit. A rescan blocked
    on the repository (a hung network mount, a stalled download, a huge model) when SIGTERM
    comes is abandoned: the default executor's threads are joined at exit, so the server
    logged "stopped" and then waited until Kubernetes SIGKILLed it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()  # the request id of the log lines, as to_thread

    def settle(ok: bool, value: Any) -> None:
        if done.done():  # the caller was cancelled meanwhile
            return
        if ok:
            done.set_result(value)
        else:
            done.set_exception(value)

    def run() -> None:
        try:
            outcome = (True, context.run(fn))
        except BaseException as exc:
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=RESCAN_THREAD, daemon=True).start()
    return await done


async def rescan(engine: Engine, health: ModelHealth) -> tuple[ReloadReport, Retired]:
    """Rescans; vanished versions take no new call from now on. Returns the report and the
    decode loops of those versions, to `retire` once the streams already running end.

    Sessions are built in a worker thread (a large model takes a while to load), so live
    streams keep their pace; only publishing the new versions runs on the event loop.
    """
    repository = engine.repository
    report = repository.install(*await in_daemon_thread(repository.load_new))
    retired: Retired = []
    for tag in report.unloaded:  # no await here: no call can slip in between
        name, version = tag.rsplit("/", 1)
        repository.remove(name, version)  # first, so a new call cannot reach it (NOT_FOUND)
        decoder = engine.pop_decoder(name, version)
        if decoder is not None:
            retired.append(decoder)
        engine.metrics.forget_version(name, version)
    await health.refresh()
    changed = report.loaded or report.unloaded or report.failed
    log.log(
        logging.INFO if changed else logging.DEBUG,
        "repository rescanned",
        extra={"loaded": report.loaded, "unloaded": report.unloaded, "failed": report.failed},
    )  # the sync logged its failures itself, at ERROR
    return report, retired


async def retire(
    decoders: Retired, closed: Callable[[DecodeLoop | DecodeProcess], None] = lambda d: None
) -> None:
    """Closes the decode loop of each removed version once its own running streams have
    ended; `closed(decoder)` after each. Each on its own: one after the other, a version with
    no stream kept its decode thread or process (and its memory) for as long as a long
    stream on another version removed by the same rescan ran."""
    await asyncio.gather(*(_retire_one(decoder, closed) for decoder in decoders))


async def _retire_one(
    decoder: DecodeLoop | DecodeProcess, closed: Callable[[DecodeLoop | DecodeProcess], None]
) -> None:
    try:
        await decoder.drain()
        await decoder.close()
    except Exception:  # the others still close; nobody may be awaiting this task
        log.exception("closing the decode loop of a removed model version failed")
    closed(decoder)
