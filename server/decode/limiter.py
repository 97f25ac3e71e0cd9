"""Server-wide admission: at most --max-streams Generate streams at once, refused (never
queued) past that, so a client learns at once that it should retry elsewhere."""

from __future__ import annotations

from rnnserve.server.errors import Overloaded, ShuttingDown


class StreamLimiter:
    """Count of admitted streams, bounded by --max-streams. Event-loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.closed = False

    def acquire(self) -> None:
        if self.closed:
            raise ShuttingDown("the server is shutting down")
        if self.active >= self.limit:
            raise Overloaded(
                f"{self.active} streams are live (--max-streams {self.limit}); retry later"
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1
