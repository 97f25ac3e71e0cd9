"""The failover loop's edges, against scripted replicas (real gRPC, no model): failures "in
a row" are attempts that deliver nothing new; a replica lost after the last message ends
nothing; cancel() during the pause before a retry stops the stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest

from rnnserve.client import AsyncRnnClient, RetryPolicy, RnnClient
from rnnserve.client.errors import Cancelled, Unavailable
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

QUICK = RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.05)
LENGTH = pb.FINISH_REASON_LENGTH


class ScriptedReplica(pb_grpc.InferenceServicer):
    """Generate runs `script(attempt, context)`: the messages of that attempt."""

    def __init__(self, script: Callable[[int, grpc.ServicerContext], Iterator]) -> None:
        self.script = script
        self.calls = 0

    def Generate(self, request, context):
        self.calls += 1
        yield from self.script(self.calls, context)


@pytest.fixture
def replica() -> Iterator[Callable[[Callable], tuple[ScriptedReplica, str]]]:
    servers = []

    def start(script: Callable) -> tuple[ScriptedReplica, str]:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        servicer = ScriptedReplica(script)
        pb_grpc.add_InferenceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def _same_token_then_gone(attempt: int, context: grpc.ServicerContext) -> Iterator:
    """Every attempt repeats the one token the caller already has, then the replica dies."""
    yield pb.GenerateResponse(token_ids=[5], text="a")
    context.abort(grpc.StatusCode.UNAVAILABLE, "replica gone")


def _last_message_then_gone(attempt: int, context: grpc.ServicerContext) -> Iterator:
    yield pb.GenerateResponse(token_ids=[5], text="a", finish_reason=LENGTH)
    if attempt == 1:
        context.abort(grpc.StatusCode.UNAVAILABLE, "replica gone after its last message")


def _gone_after_one_token(attempt: int, context: grpc.ServicerContext) -> Iterator:
    if attempt == 1:
        yield pb.GenerateResponse(token_ids=[5], text="a")
        context.abort(grpc.StatusCode.UNAVAILABLE, "replica gone")
    yield pb.GenerateResponse(token_ids=[5], text="a")
    yield pb.GenerateResponse(token_ids=[6], text="b", finish_reason=LENGTH)


def test_attempts_that_deliver_nothing_new_count_as_failures_in_a_row(replica) -> None:
    servicer, address = replica(_same_token_then_gone)
    with RnnClient([address], retry=QUICK, timeout=None) as client:
        stream = client.generate("m", "hi", max_tokens=10)
        with pytest.raises(Unavailable, match="could not be resumed: 3 attempts"):
            list(stream)
    assert servicer.calls == 3


def test_a_replica_lost_after_the_last_message_ends_nothing(replica) -> None:
    servicer, address = replica(_last_message_then_gone)
    with RnnClient([address], retry=QUICK, timeout=None) as client:
        stream = client.generate("m", "hi", max_tokens=1)
        events = list(stream)
    assert [(e.text, e.finish_reason) for e in events] == [("a", "length")]
    assert stream.failovers == 0 and servicer.calls == 1


def test_cancel_during_the_pause_before_a_retry_stops_the_stream(replica) -> None:
    servicer, address = replica(_gone_after_one_token)
    with RnnClient([address], retry=QUICK, timeout=None) as client:
        stream = client.generate("m", "hi", max_tokens=2)
        client._sleep = lambda seconds: stream.cancel()  # as if another thread cancelled
        with pytest.raises(Cancelled):
            list(stream)
    assert servicer.calls == 1


def test_cancel_while_the_next_attempt_opens_stops_the_stream(replica) -> None:
    _, address = replica(_gone_after_one_token)
    with RnnClient([address], retry=QUICK, timeout=None) as client:
        stream = client.generate("m", "hi", max_tokens=2)
        client._sleep = lambda seconds: None
        open_call = client._open

        def open_while_cancelled(*args):
            call = open_call(*args)
            stream.cancel()  # another thread's cancel(), after the check, before the switch
            return call

        client._open = open_while_cancelled
        with pytest.raises(Cancelled):
            list(stream)
    assert stream.finish_reason is None


def test_the_async_client_has_the_same_edges(replica) -> None:
    repeating, repeating_address = replica(_same_token_then_gone)
    finished, finished_address = replica(_last_message_then_gone)
    pausing, pausing_address = replica(_gone_after_one_token)

    async def main() -> None:
        async with AsyncRnnClient([repeating_address], retry=QUICK, timeout=None) as client:
            with pytest.raises(Unavailable, match="could not be resumed: 3 attempts"):
                async for _ in client.generate("m", "hi", max_tokens=10):
                    pass
        async with AsyncRnnClient([finished_address], retry=QUICK, timeout=None) as client:
            stream = client.generate("m", "hi", max_tokens=1)
            events = [e async for e in stream]
            assert [(e.text, e.finish_reason) for e in events] == [("a", "length")]
            assert stream.failovers == 0
        async with AsyncRnnClient([pausing_address], retry=QUICK, timeout=None) as client:
            stream = client.generate("m", "hi", max_tokens=2)
            asyncio.get_running_loop().call_later(0.02, stream.cancel)  # inside the 50 ms pause
            with pytest.raises(Cancelled):
                async for _ in stream:
                    pass

    asyncio.run(main())
    assert (repeating.calls, finished.calls, pausing.calls) == (3, 1, 1)
