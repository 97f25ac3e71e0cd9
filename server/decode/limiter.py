"""Server-wide admission: at most --max-streams Generate streams and --max-calls other
inference calls at once, refused (never queued) past that, so a client learns at once that it
should retry elsewhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rnnserve.server.errors import Overloaded, ShuttingDown


class StreamLimiter:
    """Count of admitted streams, bounded by --max-streams. Event-loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.closed = False

    def acquire(self) -> None:
        self.check_room(1)
        self.active += 1

    def check_room(self, streams: int) -> None:
        """Refuses unless `streams` more could be admitted now: a request of several streams
        (OpenAI's prompt list) is refused whole, rather than after some of them started."""
        if self.closed:
            raise ShuttingDown("the server is shutting down")
        if self.active + streams > self.limit:
            raise Overloaded(
                f"{self.active} streams are live (--max-streams {self.limit}); retry later"
            )

    def release(self) -> None:
        self.active -= 1


class CallLimiter:
    """Count of Score, Infill and Forecast calls in progress, bounded by --max-calls. Their
    ONNX Runtime work queues for a few executor threads; without a bound a flood of calls
    queued without end, each holding its request. Event-loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise Overloaded(
                f"{self.active} calls are in progress (--max-calls {self.limit}); retry later"
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
