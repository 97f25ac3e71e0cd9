"""The failover loop's edges, against scripted replicas (real gRPC, no model): failures "in
a row" are attempts that deliver nothing new; a replica lost after the last message ends
nothing; cancel() during the pause before a retry stops the stream; a failover target that
is full (RESOURCE_EXHAUSTED) or lacks the model (NOT_FOUND) is passed over; a continuation
asks for the checkpoint's model version."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncRnnClient, RetryPolicy, RnnClient, async_client, sync_client
from rnnserve.client.errors import Cancelled, InvalidArgument, ResourceExhausted, Unavailable
from rnnserve.server.resume import Progress, StateSigner
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

QUICK = RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.05)
HOUR = RetryPolicy(max_attempts=3, initial_backoff=3600, max_backoff=3600)
LENGTH = pb.FINISH_REASON_LENGTH
# a checkpoint as a replica serving version "2" of model "m" signs it, after one token
_PROGRESS = Progress(tokens=1, max_tokens=2, seed=0, uniforms=0, held="", temperature=0.0,
                     top_k=0, top_p=0.0, stop=())  # fmt: skip
CHECKPOINT = StateSigner("k").sign("m", "2", [np.zeros((1, 4), np.float32)], 5, _PROGRESS)


class ScriptedReplica(pb_grpc.InferenceServicer):
    """Generate runs `script(attempt, context)`: the messages of that attempt."""

    def __init__(self, script: Callable[[int, grpc.ServicerContext], Iterator]) -> None:
        self.script = script
        self.calls = 0
        self.requests: list[pb.GenerateRequest] = []

    def Generate(self, request, context):
        self.calls += 1
        self.requests.append(request)
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


def _checkpoint_then_gone(attempt: int, context: grpc.ServicerContext) -> Iterator:
    """The stream's first replica: one token with a checkpoint, then it dies."""
    yield pb.GenerateResponse(token_ids=[5], text="a", state=CHECKPOINT)
    context.abort(grpc.StatusCode.UNAVAILABLE, "replica gone")


def _the_rest(attempt: int, context: grpc.ServicerContext) -> Iterator:
    """A replica that continues the checkpoint: the stream's last token."""
    yield pb.GenerateResponse(token_ids=[6], text="b", finish_reason=LENGTH)


def _refusing(code: grpc.StatusCode, details: str) -> Callable:
    def script(attempt: int, context: grpc.ServicerContext) -> Iterator:
        context.abort(code, details)
        yield  # never reached: a generator, as Generate is

    return script


# what a failover target answers when it cannot take the stream right now
REFUSALS = {
    "full": (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent streams"),
    "rolling deploy": (grpc.StatusCode.NOT_FOUND, "model 'm' has no version '2'"),
    # a replica not yet given the new key of a rotation (docs/operations.md, step 1)
    "key rotation": (
        grpc.StatusCode.INVALID_ARGUMENT,
        "state: resume token was signed with a different --state-key (key id "
        "2b6b4dc81305d216; this replica accepts 3d46b9c9a9bb5000): give every replica the "
        "same --state-key, and during a key rotation list the old key in --state-key-previous",
    ),
}


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
        stream._pause = lambda seconds: stream.cancel()  # as if another thread cancelled
        with pytest.raises(Cancelled):
            list(stream)
    assert servicer.calls == 1


def test_cancel_while_the_next_attempt_opens_stops_the_stream(replica) -> None:
    _, address = replica(_gone_after_one_token)
    with RnnClient([address], retry=QUICK, timeout=None) as client:
        stream = client.generate("m", "hi", max_tokens=2)
        stream._pause = lambda seconds: None
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


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_failover_target_that_cannot_take_the_stream_is_passed_over(replica, refusal) -> None:
    """The replica that absorbs a dead one's streams is the one likeliest at capacity: its
    RESOURCE_EXHAUSTED (or NOT_FOUND, a replica without the model during a rolling deploy, or
    a refusal of the checkpoint's key by one still on the old key of a rotation) is a failure
    to retry elsewhere, not the end of a stream the caller is half way through."""
    _, dying = replica(_checkpoint_then_gone)
    refusing, refusing_address = replica(_refusing(*REFUSALS[refusal]))
    serving, serving_address = replica(_the_rest)
    with RnnClient([dying, refusing_address, serving_address], retry=QUICK, timeout=None) as c:
        stream = c.generate("m", "hi", max_tokens=2)
        assert [e.text for e in stream] == ["a", "b"]
    assert stream.failovers == 2 and (refusing.calls, serving.calls) == (1, 1)
    assert serving.requests[0].state == CHECKPOINT


def test_resource_exhausted_before_anything_arrived_is_an_answer(replica) -> None:
    """A stream that has delivered nothing is a new request: a full replica's answer stands
    (retrying it would only add load), as for unary calls."""
    full, address = replica(_refusing(*REFUSALS["full"]))
    _, other = replica(_the_rest)
    client = RnnClient([address, other], retry=QUICK, timeout=None)
    with client, pytest.raises(ResourceExhausted, match="too many"):
        list(client.generate("m", "hi", max_tokens=2))
    assert full.calls == 1


def test_a_key_refusal_of_the_callers_own_checkpoint_is_an_answer(replica) -> None:
    """Passed over only once the stream failed over: a checkpoint the caller brought is
    refused at once, as any other answer."""
    refusing, address = replica(_refusing(*REFUSALS["key rotation"]))
    _, other = replica(_the_rest)
    client = RnnClient([address, other], retry=QUICK, timeout=None)
    with client, pytest.raises(InvalidArgument, match="different --state-key"):
        list(client.generate("m", state=CHECKPOINT, max_tokens=2))
    assert refusing.calls == 1


@pytest.mark.parametrize("first_replica_dead", [False, True])
def test_the_callers_own_checkpoint_asks_for_its_version(replica, first_replica_dead) -> None:
    """A continuation the caller sends (state=checkpoint, no prompt) named no version, so a
    replica whose default version differs refused it ("belongs to m/2, not m/3") though it
    served version 2 too; failover's own continuations already named it."""
    serving, serving_address = replica(_the_rest)
    addresses = [_closed_address(), serving_address] if first_replica_dead else [serving_address]
    with RnnClient(addresses, retry=QUICK, timeout=None) as c:
        stream = c.generate("m", state=CHECKPOINT, max_tokens=2)
        assert [e.text for e in stream] == ["b"]
        assert stream.request.version == "2"
        assert [r.version for r in serving.requests] == ["2"]
        # pinned by the caller: kept; another model's state: left to the server to refuse
        list(c.generate("m", state=CHECKPOINT, version="7", max_tokens=2))
        list(c.generate("other", state=CHECKPOINT, max_tokens=2))
    assert [r.version for r in serving.requests[1:]] == ["7", ""]


def test_a_request_going_on_from_a_state_asks_for_its_version_without_failover_too(
    replica,
) -> None:
    serving, address = replica(_the_rest)
    with RnnClient([address], retry=QUICK, timeout=None) as c:
        list(c.generate("m", state=CHECKPOINT, max_tokens=2, failover=False))
        list(c.generate("m", "more", state=CHECKPOINT, max_tokens=2, failover=False))
    assert [r.version for r in serving.requests] == ["2", "2"]


@pytest.mark.parametrize("pinned", ["", "2"])
def test_a_continuation_asks_for_the_checkpoints_version(replica, pinned) -> None:
    """A replica whose default version differs would refuse a continuation sent with
    version="": it names the version the checkpoint was made by."""
    _, dying = replica(_checkpoint_then_gone)
    serving, serving_address = replica(_the_rest)
    with RnnClient([dying, serving_address], retry=QUICK, timeout=None) as c:
        assert [e.text for e in c.generate("m", "hi", version=pinned, max_tokens=2)] == ["a", "b"]
    assert serving.requests[0].version == "2"


@pytest.mark.parametrize("stop", ["cancel", "close"])
def test_cancel_or_close_ends_a_long_pause_at_once(replica, monkeypatch, stop) -> None:
    """cancel(), or the client's close(), from another thread while the stream waits out an
    hour's backoff: the reader gets Cancelled now, not when the pause ends (close() used to
    wait it out: the pause waited on the stream's own cancel() alone)."""
    servicer, address = replica(_gone_after_one_token)
    pausing = threading.Event()
    decide = sync_client.pause_before_next_attempt

    def noted(*args, **kwargs) -> float:
        pause = decide(*args, **kwargs)
        pausing.set()
        return pause

    monkeypatch.setattr(sync_client, "pause_before_next_attempt", noted)
    outcome: list[BaseException] = []
    with RnnClient([address], retry=HOUR, timeout=None) as client:
        stream = client.generate("m", "hi", max_tokens=2)

        def read() -> None:
            try:
                list(stream)
            except BaseException as exc:  # handed to the test thread
                outcome.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert pausing.wait(30)
        if stop == "cancel":
            stream.cancel()
        else:
            client.close()
        reader.join(60)  # generous: far below the hour the pause would otherwise last
        assert not reader.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    assert servicer.calls == 1


async def _stopped_in_the_pause(monkeypatch, stream, stop: Callable[[], object]) -> None:
    """Reads `stream`, with `stop` run as soon as the stream waits out its (hour-long) pause
    before a retry: the read ends Cancelled at once."""
    decide = async_client.pause_before_next_attempt

    def stop_in_the_pause(*args, **kwargs) -> float:
        pause = decide(*args, **kwargs)
        asyncio.get_running_loop().call_soon(stop)  # runs once it waits
        return pause

    monkeypatch.setattr(async_client, "pause_before_next_attempt", stop_in_the_pause)

    async def read() -> None:
        async for _ in stream:
            pass

    with pytest.raises(Cancelled):
        await asyncio.wait_for(read(), 60)  # generous: the pause is an hour


def test_closing_the_async_client_ends_a_long_pause_at_once(replica, monkeypatch) -> None:
    _, address = replica(_gone_after_one_token)

    async def main() -> None:
        client = AsyncRnnClient([address], retry=HOUR, timeout=None)
        stream = client.generate("m", "hi", max_tokens=2)

        def close() -> object:
            return asyncio.ensure_future(client.close())

        await _stopped_in_the_pause(monkeypatch, stream, close)

    asyncio.run(main())


def test_the_async_client_passes_over_refusals_pins_the_version_and_cancels_a_pause(
    replica, monkeypatch
) -> None:
    _, dying = replica(_checkpoint_then_gone)
    full, full_address = replica(_refusing(*REFUSALS["full"]))
    serving, serving_address = replica(_the_rest)
    pausing, pausing_address = replica(_gone_after_one_token)

    async def main() -> None:
        addresses = [dying, full_address, serving_address]
        async with AsyncRnnClient(addresses, retry=QUICK, timeout=None) as client:
            stream = client.generate("m", "hi", max_tokens=2)
            assert [e.text async for e in stream] == ["a", "b"]
            assert stream.failovers == 2
        async with AsyncRnnClient([pausing_address], retry=HOUR, timeout=None) as client:
            stream = client.generate("m", "hi", max_tokens=2)
            await _stopped_in_the_pause(monkeypatch, stream, stream.cancel)

    asyncio.run(main())
    assert (full.calls, serving.calls, pausing.calls) == (1, 1, 1)
    assert serving.requests[0].version == "2"


def _closed_address() -> str:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        return f"127.0.0.1:{closed.getsockname()[1]}"  # closed on return: nothing listens


@pytest.mark.parametrize("delivered", [True, False])
def test_one_attempt_allowed_says_so_not_whether_the_stream_started(replica, delivered) -> None:
    """With retry.max_attempts=1 a stream that had delivered tokens ended "the stream could
    not be started": the stream never failed over, so nothing told the two cases apart."""
    script = _gone_after_one_token if delivered else _refusing(grpc.StatusCode.UNAVAILABLE, "gone")
    _, address = replica(script)
    with RnnClient([address], retry=RetryPolicy(max_attempts=1), timeout=None) as client:
        stream = client.generate("m", "hi", max_tokens=2)
        with pytest.raises(Unavailable, match="max_attempts=1 allows no retry") as err:
            list(stream)
    assert "could not be" not in str(err.value)
    assert (stream.text, stream.failovers) == ("a" if delivered else "", 0)


def test_a_stream_no_replica_ever_started_does_not_say_resumed() -> None:
    """With every replica down from the start, the error said "the stream could not be
    resumed", though nothing had been delivered to resume."""
    address = _closed_address()
    with (
        RnnClient([address], retry=QUICK, timeout=5) as client,
        pytest.raises(Unavailable, match="could not be started: 3 attempts"),
    ):
        list(client.generate("m", "hi", max_tokens=4))


def test_the_final_error_names_the_last_refusal_when_a_dead_replica_failed_last(replica) -> None:
    """The docs promise the final Unavailable names the last NOT_FOUND; with a dead replica
    tried after the refusing one, it named only the dead replica's connection failure."""
    _, dying = replica(_checkpoint_then_gone)
    _, refusing = replica(_refusing(*REFUSALS["rolling deploy"]))
    client = RnnClient([dying, refusing, _closed_address()], retry=QUICK, timeout=None)
    with client, pytest.raises(Unavailable) as caught:
        list(client.generate("m", "hi", max_tokens=2))
    message = str(caught.value)
    assert "could not be resumed: 3 attempts" in message
    assert "last refusal by a live replica" in message and "has no version '2'" in message
