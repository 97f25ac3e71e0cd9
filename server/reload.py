"""Hot reload triggers besides the Admin RPC: SIGHUP and --poll-interval.

Both go through AdminService.rescan, so every rescan (RPC, signal, timer) is serialised by
its lock and does the same thing: load new version directories (a broken one is logged and
kept NOT_SERVING while older versions serve), unload removed versions once their streams end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from rnnserve.server.admin import AdminService
from rnnserve.server.repository import ReloadReport

log = logging.getLogger(__name__)


class Reloader:
    """Owns the SIGHUP handler and the polling task of one running server."""

    def __init__(self, admin: AdminService, poll_interval: float) -> None:
        self.admin = admin
        self.poll_interval = poll_interval
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.trigger, "SIGHUP")
        if self.poll_interval > 0:
            self._spawn(self._poll())

    def trigger(self, why: str) -> None:
        """Schedules one rescan (safe to call from a signal handler on the loop)."""
        self._spawn(self.reload(why))

    async def reload(self, why: str) -> ReloadReport | None:
        """One rescan. Removed versions close in the background once their streams end, so
        a long stream on one of them does not hold up the next poll."""
        try:
            report, _retiring = await self.admin.rescan()
        except Exception:
            log.exception("reload (%s) failed", why)
            return None
        if report.loaded or report.unloaded or report.failed:
            log.info("reload (%s) changed the repository", why, extra={"trigger": why})
        return report

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.reload("poll")

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Ends reloading. A later SIGHUP is ignored: its default action would kill the
        process in the middle of its drain (under --workers, any worker's ReloadModels has
        the parent send one to every worker)."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        with contextlib.suppress(ValueError):  # not the main thread: no handler was set
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
