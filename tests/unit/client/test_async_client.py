"""AsyncRnnClient against the fake server: same results, errors, retry rules as RnnClient."""

from __future__ import annotations

import asyncio
import gc
import threading

import grpc
import pytest

from rnnserve.client import (
    AsyncRnnClient,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    RetryPolicy,
    Unavailable,
)

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.01)
U = grpc.StatusCode.UNAVAILABLE


def run(coro):
    return asyncio.run(coro)


def test_async_generate_and_unary_calls(fake) -> None:
    rec, address = fake

    async def scenario():
        async with AsyncRnnClient(address, token="t", retry=FAST_RETRY) as c:
            await c.wait_ready(5)
            stream = c.generate("lstm", "abc", max_tokens=4, return_state=True)
            events = [e async for e in stream]
            score = await c.score("lstm", ["hello"])
            cands = await c.infill("lstm", "a", "c", top_k=2)
            fc = await c.forecast("sine-gru", [1.0, 2.0], 3)
            models = await c.list_models()
            info = await c.get_model("sine-gru")
            reload = await c.reload_models()
            return stream, events, score, cands, fc, models, info, reload

    stream, events, score, cands, fc, models, info, reload = run(scenario())
    assert stream.text == "cbac" and events[-1].finish_reason == "length"
    assert stream.state == b"abccbac"
    assert score[0].num_tokens == 4
    assert len(cands) == 2
    assert fc.forecast == (3.0, 4.0, 5.0)
    assert [m.name for m in models] == ["lstm", "sine-gru"]
    assert info.version().task == "forecast"
    assert reload.loaded == ("gru/2",)
    assert {m.get("authorization") for m in rec.metadata} == {"Bearer t"}


def test_async_errors_and_retries(fake) -> None:
    rec, address = fake
    rec.script.failures["Score"] = [U]
    rec.script.failures["Generate"] = [U]

    async def scenario():
        async with AsyncRnnClient(address, retry=FAST_RETRY) as c:
            await c.score("lstm", ["ab"])  # retried once, then succeeds
            with pytest.raises(Unavailable):
                [e async for e in c.generate("lstm", "ab", failover=False)]
            with pytest.raises(NotFound):
                await c.get_model("nope")
            with pytest.raises(FailedPrecondition):
                [e async for e in c.generate("bilstm", "ab")]

    run(scenario())
    assert rec.calls["Score"] == 2
    assert rec.calls["Generate"] == 2  # one UNAVAILABLE (no failover asked) + the bilstm call


def test_async_deadline(fake) -> None:
    rec, address = fake
    rec.script.hold = threading.Event()

    async def scenario():
        async with AsyncRnnClient(address, timeout=0.2) as c:
            with pytest.raises(DeadlineExceeded):
                await c.list_models()

    run(scenario())


def test_async_cancel_raises_cancelled_as_the_sync_client_does(fake) -> None:
    """stream.cancel() from another task ends the reader with Cancelled (an RnnServeError),
    not asyncio.CancelledError, which would mark the reading task itself cancelled; the
    task's own cancellation still raises CancelledError."""
    rec, address = fake
    rec.script.hold = threading.Event()  # the stream sends nothing until released

    async def read(stream) -> list:
        return [e async for e in stream]

    async def scenario():
        async with AsyncRnnClient(address) as c:
            stream = c.generate("lstm", "abc", max_tokens=4)
            task = asyncio.create_task(read(stream))
            # the call is on the server (held there) before it is cancelled, not a guess
            assert await _until(lambda: rec.calls["Generate"] == 1)
            stream.cancel()
            with pytest.raises(Cancelled, match=r"^CANCELLED: "):
                await task
            assert not task.cancelled()
            task = asyncio.create_task(read(c.generate("lstm", "abc", max_tokens=4)))
            assert await _until(lambda: rec.calls["Generate"] == 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(scenario())


async def _until(condition, limit: float = 10.0) -> bool:
    """Polls `condition` until true or `limit` seconds pass (a bound, not a timing claim)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not condition() and loop.time() < end:
        await asyncio.sleep(0.02)
    return condition()


def test_breaking_out_of_a_stream_stops_it_on_the_server(fake) -> None:
    """`break` out of `async for` used to leave the server generating into a full window (a
    grpc.aio call is kept alive by its own reader), holding a batch slot until close()."""
    rec, address = fake

    async def scenario():
        async with AsyncRnnClient(address) as c:
            assert await _until(lambda: rec.live_streams == 0)
            async for _event in c.generate("lstm", "abc", max_tokens=2**31 - 1):
                break
            assert await _until(lambda: rec.live_streams == 0), "the stream is still live"
            # a stream read to its end is unaffected
            assert "".join([e.text async for e in c.generate("lstm", "ab", max_tokens=2)]) == "ba"

    run(scenario())


def test_closing_the_client_ends_running_calls_with_cancelled(fake) -> None:
    """close() from another task ends a stream being read and a unary call in flight with
    Cancelled: the stream raised a bare asyncio.CancelledError (the reading task looked
    cancelled), and the unary call too."""
    rec, address = fake
    rec.script.hold = threading.Event()  # every call waits on the server until released

    async def read(stream) -> list:
        return [e async for e in stream]

    async def scenario():
        c = AsyncRnnClient(address, retry=FAST_RETRY)
        stream_task = asyncio.create_task(read(c.generate("lstm", "abc", max_tokens=4)))
        unary_task = asyncio.create_task(c.list_models())
        assert await _until(lambda: rec.calls["Generate"] == rec.calls["ListModels"] == 1)
        await c.close()
        for task in (stream_task, unary_task):
            with pytest.raises(Cancelled, match=r"^CANCELLED: Channel closed!$"):
                await task
            assert not task.cancelled()

    run(scenario())


def test_a_closed_client_refuses_new_calls_with_cancelled(fake) -> None:
    """A call after close() raised grpc's UsageError "Channel is closed." (no RnnServeError),
    and wait_ready returned as if a replica were ready."""
    rec, address = fake

    async def scenario():
        c = AsyncRnnClient(address, retry=FAST_RETRY)
        await c.close()
        with pytest.raises(Cancelled, match=r"^CANCELLED: Channel closed!$"):
            await c.list_models()
        with pytest.raises(Cancelled, match=r"^CANCELLED: Channel closed!$"):
            c.generate("lstm", "a")
        with pytest.raises(Cancelled, match=r"^CANCELLED: Channel closed!$"):
            await c.wait_ready(5)

    run(scenario())
    assert rec.calls == {}


def test_a_client_used_in_another_event_loop_says_so(fake) -> None:
    """grpc.aio binds channels to their loop: a second asyncio.run failed with grpc's "Event
    loop is closed" (and a "never awaited" warning), naming no cause."""
    _rec, address = fake

    async def make() -> AsyncRnnClient:
        c = AsyncRnnClient(address)
        assert len(await c.list_models()) == 2
        return c

    client = run(make())

    async def use() -> None:
        with pytest.raises(RuntimeError, match="bound to the event loop it was created in"):
            await client.list_models()
        with pytest.raises(RuntimeError, match="bound to the event loop it was created in"):
            client.generate("lstm", "ab")

    run(use())


def test_close_during_the_pause_before_a_retry_ends_the_call_with_cancelled(fake) -> None:
    """close() from another task while a unary call waited to retry: the pause ran on (up to
    max_backoff), then the retry on the closed channel raised grpc's UsageError "Channel is
    closed.", no RnnServeError."""
    rec, address = fake
    rec.script.failures["ListModels"] = [U]
    slow = RetryPolicy(max_attempts=2, initial_backoff=600, max_backoff=600, jitter_floor=1)

    async def scenario():
        c = AsyncRnnClient(address, timeout=None, retry=slow)
        task = asyncio.create_task(c.list_models())
        assert await _until(lambda: rec.calls["ListModels"] == 1)
        await c.close()
        with pytest.raises(Cancelled, match=r"^CANCELLED: Channel closed!$"):
            await asyncio.wait_for(task, 10)

    run(scenario())
    assert rec.calls["ListModels"] == 1


def test_close_ends_a_wait_ready_with_cancelled() -> None:
    """close() from another task while wait_ready waited: it returned as if a replica were
    ready, and asyncio logged "Task exception was never retrieved" (grpc's UsageError)."""
    problems: list[dict] = []

    async def scenario():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: problems.append(ctx))
        c = AsyncRnnClient("127.0.0.1:1")
        task = asyncio.create_task(c.wait_ready(None))
        await asyncio.sleep(0)  # wait_ready has started watching the channel
        await c.close()
        with pytest.raises(Cancelled, match=r"^CANCELLED: Channel closed!$"):
            await asyncio.wait_for(task, 10)
        gc.collect()  # a task whose exception nobody read complains when collected
        await asyncio.sleep(0)

    run(scenario())
    assert problems == []


def test_a_cancelled_wait_ready_stops_watching_the_channels() -> None:
    """wait_ready under asyncio.wait_for (or a cancelled task) left its channel watches
    running: they lived as long as the client and failed unread once it closed."""
    problems: list[dict] = []

    async def others() -> set[asyncio.Task]:
        return asyncio.all_tasks() - {asyncio.current_task()}

    async def scenario():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: problems.append(ctx))
        c = AsyncRnnClient("127.0.0.1:1")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.wait_ready(None), 0.1)
        left: set[asyncio.Task] = set()
        for _ in range(100):  # a bound, not a timing claim: cancelled tasks end in a few steps
            left = await others()
            if not left:
                break
            await asyncio.sleep(0.01)
        await c.close()
        gc.collect()
        await asyncio.sleep(0)
        return left

    assert run(scenario()) == set()
    assert problems == []
