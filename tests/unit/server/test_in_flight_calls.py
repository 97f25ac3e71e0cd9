"""InFlightCalls, what the drain waits on with the gRPC port open (App._stop_grpc)."""

from __future__ import annotations

import asyncio

from rnnserve.server.interceptors import InFlightCalls


def test_wait_idle_says_false_when_a_call_outlasts_the_timeout() -> None:
    """A stream longer than --grace: the drain goes on to grpc's stop, which cancels it. On
    Python 3.10 asyncio.wait_for raises asyncio.TimeoutError, not the builtin TimeoutError
    (one class from 3.11 on): caught as the builtin only, it escaped the shutdown, which
    then never stopped the port nor closed the decode loops."""

    async def drain() -> tuple[bool, bool]:
        calls = InFlightCalls()
        calls.enter()
        timed_out = await calls.wait_idle(0.01)
        calls.leave()
        return timed_out, await calls.wait_idle(0.01)

    assert asyncio.run(drain()) == (False, True)
