"""Generate failover: a stream whose connection is reset mid-way goes on from its last
checkpoint on another replica, and the caller sees exactly the text of an undisturbed run.

Real parts: two in-process rnn-servers (real gRPC on localhost, ONNX Runtime, the tiny zoo)
sharing a --state-key, each behind a small TCP proxy that resets its connections (RST) after
a set number of bytes from the server: a replica dying mid-stream, at a reproducible point.
The ledger that skips repeated tokens is also tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnserve.client import AsyncRnnClient, RetryPolicy, RnnClient
from rnnserve.client.errors import (
    Cancelled,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from rnnserve.client.failover import (
    StreamDiverged,
    StreamLedger,
    is_replica_failure,
    with_failover_defaults,
)
from rnnserve.client.results import TokenEvent
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings

THROTTLE_S = 0.005  # per 2 KiB from the server: about 400 KiB/s
FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
PROMPT = "the time traveller "


class ResettingProxy:
    """TCP proxy to one or more upstreams (round robin per connection, like a load
    balancer). `reset()` resets its connections (RST, as a dead host's kernel would) and,
    with `die`, refuses new ones from then on."""

    def __init__(self, upstreams: list[int], die: bool = True, pace: float = THROTTLE_S) -> None:
        self.upstreams = itertools.cycle(upstreams)
        self.pace = pace
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.die = die
        self.resets = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", next(self.upstreams)))
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, 0), daemon=True).start()
            pace = self.pace
            threading.Thread(target=self._pump, args=(upstream, client, pace), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, pace: float) -> None:
        """Copies src to dst; `pace` seconds after each 2 KiB make the server's answers
        arrive over a slow link, so a stream is still in flight when the test resets it
        (a tiny model on an idle server would otherwise finish before the reader looks)."""
        try:
            while data := src.recv(2048):
                dst.sendall(data)
                time.sleep(pace)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _stop_listening(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        with contextlib.suppress(OSError):
            self.listener.close()

    def reset(self) -> None:
        self.resets += 1
        if self.die:
            self._stop_listening()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)  # wakes the pump's recv(), so close() is final
            with contextlib.suppress(OSError):
                s.close()  # with linger 0: an RST

    def close(self) -> None:
        self._stop_listening()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()


def _checkpoint_passed(events: list[TokenEvent]) -> bool:
    """A checkpoint arrived and a few messages after it: a reset now makes the next
    replica repeat tokens the caller already has."""
    marks = [i for i, e in enumerate(events) if e.state and not e.is_last]
    return bool(marks) and len(events) - marks[-1] > 2


def _read(stream, proxy: ResettingProxy) -> list[TokenEvent]:
    """Reads the whole stream, resetting `proxy` once mid-way (after a checkpoint)."""
    events = []
    for event in stream:
        events.append(event)
        if not proxy.resets and _checkpoint_passed(events):
            proxy.reset()
    return events


# A message at least every millisecond (the default coalesces 5 ms of tokens): a 4000-token
# stream of the tiny test model then spans enough messages to be reset while it still runs.
SPREAD = {"max_tokens": 5000, "stream_interval_us": 1000}


@pytest.fixture(scope="module")
def servers(model_repo: Path) -> Iterator[list[ServerThread]]:
    group = [
        ServerThread(make_settings(model_repo, state_key="shared", **SPREAD)).start()
        for _ in range(2)
    ]
    yield group
    for s in group:
        s.stop()


def _reference(server: ServerThread, request: pb.GenerateRequest) -> tuple[list[int], str]:
    msgs = list(server.stub.Generate(request, timeout=60))
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)


CASES = {
    "greedy": dict(model="gru"),
    "seeded": dict(model="lstm", temperature=0.9, top_k=10, seed=4),
    "client-seeded": dict(model="lstm", temperature=1.0, top_p=0.95),
    # "eqqq" never completes, but its start is held back at every "e" (letters only: a
    # stop "e\x01" would be "e " as the model's text spells it, and stop at once)
    "stop strings": dict(model="lstm", temperature=0.7, seed=9, stop=["eqqq", "zq"]),
}


@pytest.mark.parametrize("case", CASES)
def test_reset_mid_stream_continues_on_the_other_replica(servers, case) -> None:
    a, b = servers
    pa, pb_ = ResettingProxy([a.app.port]), ResettingProxy([b.app.port])
    try:
        with RnnClient([pa.address, pb_.address], retry=FAST, timeout=60, state_every=8) as c:
            stream = c.generate(prompt=PROMPT, max_tokens=4000, **CASES[case])
            events = _read(stream, pa)
            assert pa.resets == 1 and stream.failovers == 1
            ids = [t for e in events for t in e.token_ids]
            assert (ids, stream.text) == _reference(a, stream.request)
            assert events[-1].finish_reason == "length"
            lp = sum(e.logprob for e in events)
            assert lp == pytest.approx(sum(m.logprob for m in a.stub.Generate(stream.request)))
            # the dead replica refuses connections: the next stream moves on at once
            again = c.generate(prompt=PROMPT, max_tokens=20, **CASES[case])
            assert [t for e in again for t in e.token_ids] == _reference(b, again.request)[0]
    finally:
        pa.close()
        pb_.close()


def test_one_load_balanced_address_fails_over_through_the_balancer(servers) -> None:
    a, b = servers
    # the balancer lives on; a slower link keeps the stream in flight past its checkpoints
    # (the client's default state_every is 64, and a lone stream's messages carry ~1 ms)
    lb = ResettingProxy([a.app.port, b.app.port], die=False, pace=4 * THROTTLE_S)
    try:
        with RnnClient(lb.address, retry=FAST, timeout=60) as c:
            stream = c.generate("lstm", PROMPT, max_tokens=4000, temperature=0.8, seed=1)
            ids = [t for e in _read(stream, lb) for t in e.token_ids]
            assert lb.resets == 1 and stream.failovers == 1
            assert ids == _reference(a, stream.request)[0]
    finally:
        lb.close()


def test_async_client_fails_over_the_same_way(servers) -> None:
    a, b = servers
    pa, pb_ = ResettingProxy([a.app.port]), ResettingProxy([b.app.port])

    async def main():
        async with AsyncRnnClient([pa.address, pb_.address], retry=FAST, timeout=60) as c:
            stream = c.generate("lstm", PROMPT, max_tokens=4000, temperature=0.9, seed=2)
            events = []
            async for event in stream:
                events.append(event)
                if not pa.resets and _checkpoint_passed(events):
                    pa.reset()
            return stream, [t for e in events for t in e.token_ids]

    try:
        stream, ids = asyncio.run(main())
        assert pa.resets == 1 and stream.failovers == 1
        assert ids == _reference(a, stream.request)[0]
    finally:
        pa.close()
        pb_.close()


def test_a_stream_that_cannot_be_resumed_ends_with_a_clear_error(servers) -> None:
    a, _ = servers
    pa = ResettingProxy([a.app.port])
    dead = socket.create_server(("127.0.0.1", 0))
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # nothing listens there
    try:
        with RnnClient([pa.address, dead_address], retry=FAST, timeout=10) as c:
            stream = c.generate("gru", PROMPT, max_tokens=4000)
            got: list[TokenEvent] = []
            with pytest.raises(Unavailable, match="could not be resumed: 4 attempts") as err:
                for event in stream:
                    got.append(event)
                    if not pa.resets and _checkpoint_passed(got):
                        pa.reset()
            assert dead_address in str(err.value)
            ids = [t for e in got for t in e.token_ids]
            assert ids and ids == _reference(a, stream.request)[0][: len(ids)]
    finally:
        pa.close()


def test_replicas_with_different_keys_refuse_the_checkpoint(model_repo: Path, servers) -> None:
    """No replica left with the key: the stream ends naming the refusal. A replica without
    the key is passed over like one without the model (key rotations roll out one replica
    at a time); attempts alternate between the dead one and it, so the fourth and last is
    its refusal."""
    a, _ = servers
    other = ServerThread(make_settings(model_repo, state_key="not-shared", **SPREAD))
    other.start()
    pa, po = ResettingProxy([a.app.port]), ResettingProxy([other.app.port])
    try:
        c = RnnClient([pa.address, po.address], retry=FAST, timeout=60)
        with c, pytest.raises(Unavailable, match="could not be resumed: 4 attempts") as err:
            _read(c.generate("gru", PROMPT, max_tokens=4000), pa)
        assert "signed with a different --state-key" in str(err.value)
    finally:
        pa.close()
        po.close()
        other.stop()


def test_a_key_rotation_rolling_out_loses_no_stream(model_repo: Path, servers) -> None:
    """docs/operations.md: during step 1 of a rotation a replica still on the old key alone
    refuses the new key's checkpoints, and "failover moves on to the next replica": the
    stream went no further than that replica (INVALID_ARGUMENT raised mid-stream)."""
    a, b = servers  # on "shared": the rotated replicas sign with it
    old_only = ServerThread(make_settings(model_repo, state_key="old", **SPREAD)).start()
    pa, po, pb_ = (ResettingProxy([s.app.port]) for s in (a, old_only, b))
    try:
        with RnnClient([pa.address, po.address, pb_.address], retry=FAST, timeout=60) as c:
            stream = c.generate("lstm", PROMPT, max_tokens=4000, temperature=0.9, seed=6)
            ids = [t for e in _read(stream, pa) for t in e.token_ids]
            assert pa.resets == 1 and stream.failovers == 2  # refused by old_only, then b
            assert ids == _reference(b, stream.request)[0]
    finally:
        for proxy in (pa, po, pb_):
            proxy.close()
        old_only.stop()


# -- the ledger on its own ------------------------------------------------------------------
def _msg(ids: list[int], text: str, lp: float, state: bytes = b"", last: bool = False):
    reason = pb.FINISH_REASON_LENGTH if last else pb.FINISH_REASON_UNSPECIFIED
    return pb.GenerateResponse(token_ids=ids, token_id=ids[-1] if ids else -1, text=text,
                               logprob=lp, state=state, finish_reason=reason)  # fmt: skip


def test_ledger_skips_what_the_caller_has_and_splits_the_logprob() -> None:
    ledger = StreamLedger(pb.GenerateRequest(model="m", prompt="p", max_tokens=9))
    assert ledger.attempt().prompt == "p"
    ledger.take(_msg([1, 2], "ab", -1.0, state=b"CP"))
    ledger.take(_msg([3], "c", -0.5))
    ledger.take(_msg([4, 5], "d", -0.25))  # "e" held back by a stop-string prefix
    retry = ledger.attempt()
    assert retry.prompt == "" and retry.state == b"CP" and retry.max_tokens == 9
    assert ledger.take(_msg([3, 4], "cd", -0.5)) is None  # all repeated
    event = ledger.take(_msg([5, 6], "ef", -0.75))
    assert event.token_ids == (6,) and event.text == "ef"
    # the attempt's running sum (-1.0 at the checkpoint, -0.5, -0.75) minus what was delivered
    assert event.logprob == pytest.approx(-2.25 - -1.75)
    assert ledger.token_ids == [1, 2, 3, 4, 5, 6] and "".join(ledger.text) == "abcdef"


def test_ledger_refuses_a_diverging_continuation() -> None:
    ledger = StreamLedger(pb.GenerateRequest(model="m", prompt="p"))
    ledger.take(_msg([1], "a", -1.0, state=b"CP"))
    ledger.take(_msg([2], "b", -1.0))
    ledger.attempt()
    with pytest.raises(StreamDiverged, match="repeated tokens"):
        ledger.take(_msg([7], "x", -1.0))


def test_a_continuation_names_the_version_its_checkpoint_was_made_by(servers) -> None:
    """Sent with version="", a replica whose default version differs refuses it; a version the
    caller pinned stays, and a checkpoint that does not say leaves it unset."""
    a, _ = servers
    request = pb.GenerateRequest(model="gru", prompt=PROMPT, max_tokens=20, state_every=4)
    state = next(m.state for m in a.stub.Generate(request, timeout=60) if m.state)
    for asked, pinned in [("", "1"), ("1", "1")]:  # the test zoo's gru is version 1
        ledger = StreamLedger(pb.GenerateRequest(model="gru", prompt="p", version=asked))
        ledger.take(_msg([1], "a", -1.0, state=state))
        assert ledger.attempt().version == pinned
    ledger = StreamLedger(pb.GenerateRequest(model="m", prompt="p"))
    ledger.take(_msg([1], "a", -1.0, state=b"RS\x02\x00\x00\x00\x02{}"))
    assert ledger.attempt().version == ""


def test_a_restart_before_the_first_checkpoint_asks_for_the_version_that_served_it(
    servers,
) -> None:
    """The first message names the version an empty request version resolved to; a restart
    before any checkpoint asks for it, so a replica whose default is a newer model does not
    replace the delivered tokens with its own. A version the caller pinned stays."""
    a, _ = servers
    # 400 tokens span several messages even for a slow reader (whose pending messages the
    # server merges, checkpoints included), as in tests/e2e/test_grpcurl.py
    request = pb.GenerateRequest(model="gru", prompt=PROMPT, max_tokens=400)
    served, *rest = a.stub.Generate(request, timeout=60)
    assert served.model_version == "1"  # the test zoo's gru is version 1
    assert rest and all(m.model_version == "" for m in rest)  # the first message only
    first = _msg(list(served.token_ids), served.text, served.logprob)  # before a checkpoint
    first.model_version = served.model_version
    ledger = StreamLedger(pb.GenerateRequest(model="gru", prompt="p", max_tokens=9))
    ledger.take(first)
    restart = ledger.attempt()
    assert restart.version == "1" and restart.prompt == "p" and not restart.state
    assert ledger.request.version == ""  # the caller's request is left as it was
    pinned = StreamLedger(pb.GenerateRequest(model="gru", prompt="p", version="2"))
    pinned.take(first)
    assert pinned.attempt().version == "2"
    unsaid = StreamLedger(pb.GenerateRequest(model="gru", prompt="p"))
    unsaid.take(_msg([1], "a", -1.0))  # an older server names no version
    assert unsaid.attempt().version == ""


def test_failover_requests_carry_checkpoints_and_a_seed() -> None:
    sampled = pb.GenerateRequest(model="m", prompt="p", sampling=pb.SamplingParams(temperature=1))
    with_failover_defaults(sampled, 16)
    assert sampled.state_every == 16 and sampled.sampling.HasField("seed")
    greedy = pb.GenerateRequest(model="m", prompt="p", state_every=4)
    with_failover_defaults(greedy, 16)
    assert greedy.state_every == 4 and not greedy.sampling.HasField("seed")


@pytest.mark.parametrize("client_class", [RnnClient, AsyncRnnClient])
@pytest.mark.parametrize("every", [-1, 2**32])
def test_a_checkpoint_interval_out_of_range_is_refused_naming_it(client_class, every) -> None:
    with pytest.raises(ValueError, match="state_every must be in"):
        client_class("127.0.0.1:1", state_every=every)


def test_a_sampled_checkpoint_continues_through_the_client_without_its_seed(servers) -> None:
    """The seed of a continuation comes from its checkpoint (the server's own when the
    original request gave none): the client must not invent one that the server refuses."""
    a, _ = servers
    sampling = pb.SamplingParams(temperature=0.9, top_k=10)  # no seed: the server picks one
    request = pb.GenerateRequest(model="lstm", prompt=PROMPT, max_tokens=40, state_every=8,
                                 sampling=sampling)  # fmt: skip
    for _ in range(50):  # the server's seed is random: a stream may draw <eos> before 8 tokens
        msgs = list(a.stub.Generate(request, timeout=60))
        checkpoints = [i for i, m in enumerate(msgs) if m.state and not m.finish_reason]
        if checkpoints:
            break
    i = checkpoints[0]
    rest = "".join(m.text for m in msgs[i + 1 :])
    with RnnClient(f"127.0.0.1:{a.app.port}", timeout=60) as c:
        stream = c.generate("lstm", max_tokens=40, temperature=0.9, top_k=10, state=msgs[i].state)
        assert "".join(e.text for e in stream) == rest
        assert not stream.request.sampling.HasField("seed")
    # a final state (no progress) with no prompt starts a new stream: it still gets a seed
    final = pb.GenerateRequest(model="m", state=msgs[-1].state, sampling=sampling)
    assert msgs[-1].finish_reason and msgs[-1].state
    with_failover_defaults(final, 16)
    assert final.sampling.HasField("seed")


# what server/resume.py answers for a token signed with a key the replica lacks
OTHER_KEY = "resume token was signed with a different --state-key (key id 0123456789abcdef)"


@pytest.mark.parametrize(
    "error, failure",
    [
        (Unavailable("Socket closed"), True),
        (Cancelled("CANCELLED"), True),  # by a stopping replica; a cancel() of ours stops first
        (Internal("Received RST_STREAM with error code 2"), True),
        (Internal("Exception iterating responses"), False),
        (NotFound("model x"), False),
        (FailedPrecondition("model bilstm cannot Generate"), False),  # an answer at first
        (InvalidArgument(f"state: {OTHER_KEY}"), False),  # an answer at first
    ],
)
def test_which_errors_mean_the_replica_is_gone(error, failure) -> None:
    assert is_replica_failure(error) is failure


@pytest.mark.parametrize(
    "error, failure",
    [
        (ResourceExhausted("too many concurrent streams"), True),  # a full failover target
        (NotFound("model 'm' has no version '2'"), True),  # a replica not yet rolled out
        # the version failed to load on this replica (the first one served it)
        (FailedPrecondition("model m/2 is NOT_SERVING: model.onnx: unreadable"), True),
        # a replica not yet given the new key of a rotation (docs/operations.md)
        (InvalidArgument(f"state: {OTHER_KEY}"), True),
        (InvalidArgument("state: resume token signature is invalid (forged or corrupted)"), False),
        (InvalidArgument("state: resume token expired at 2024-05-01T12:00:00Z"), False),
        (InvalidArgument("max_tokens: is 9 but the stream ... had 8"), False),
        (Internal("Exception iterating responses"), False),
    ],
)
def test_which_errors_mean_the_replica_is_gone_once_the_caller_holds_part_of_the_stream(
    error, failure
) -> None:
    assert is_replica_failure(error, resuming=True) is failure


def _dead_address() -> str:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed on return: nothing listens


def test_unary_calls_move_on_from_a_dead_replica(servers) -> None:
    a, _ = servers
    with RnnClient([_dead_address(), f"127.0.0.1:{a.app.port}"], retry=FAST) as c:
        for _ in range(3):  # whichever replica the round robin starts on
            assert "lstm" in {m.name for m in c.list_models()}


def test_rnn_client_generate_takes_a_list_of_replicas(servers, capsys) -> None:
    from rnnserve.client import cli

    a, _ = servers
    address = f"{_dead_address()},127.0.0.1:{a.app.port}"
    argv = ["--address", address, "generate", "--model", "gru", "--prompt", PROMPT,
            "--max-tokens", "30", "--state-every", "8"]  # fmt: skip
    assert cli.main(argv) == 0
    request = pb.GenerateRequest(model="gru", prompt=PROMPT, max_tokens=30, state_every=8)
    assert capsys.readouterr().out == _reference(a, request)[1] + "\n"


def test_address_lists() -> None:
    from rnnserve.client.connection import address_list

    assert address_list("a:1, b:2") == ["a:1", "b:2"]
    assert address_list(["a:1"]) == ["a:1"]
    assert address_list("ipv4:10.0.0.1:1,10.0.0.2:1") == ["ipv4:10.0.0.1:1,10.0.0.2:1"]
    assert address_list("dns:///svc:50051") == ["dns:///svc:50051"]
    with pytest.raises(ValueError, match="at least one"):
        address_list(" , ")
