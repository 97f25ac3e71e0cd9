"""RnnClient against a fake in-process server: typed results, errors, retries, deadlines."""

from __future__ import annotations

import re
import socket
import threading
import time

import grpc
import pytest

from rnnserve.client import (
    NO_RETRY,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    ForecastResult,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    RnnClient,
    ScoreResult,
    TokenEvent,
    Unavailable,
)
from tests.unit.client import fake_server
from tests.unit.client.fake_server import Recorder

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.01)
U = grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def client(fake: tuple[Recorder, str]):
    with RnnClient(fake[1], timeout=10, retry=FAST_RETRY, token="s3cret") as c:
        yield c


def test_generate_streams_typed_events(client: RnnClient, fake) -> None:
    stream = client.generate("lstm", "abc", max_tokens=5, seed=7, stop=["x"])
    events = list(stream)
    assert all(isinstance(e, TokenEvent) for e in events)
    assert "".join(e.text for e in events) == stream.text == "cbacb"
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]
    assert events[0].token_ids == (events[0].token_id,)
    request = fake[0].requests[-1]
    assert (request.sampling.seed, list(request.stop), request.max_tokens) == (7, ["x"], 5)
    assert stream.finish_reason == "length" and stream.state is None


def test_generate_returns_and_accepts_resume_state(client: RnnClient) -> None:
    first = client.generate("lstm", "ab", max_tokens=2, return_state=True)
    list(first)
    assert first.state == b"abba"
    second = client.generate("lstm", state=first.state, max_tokens=3)
    assert "".join(e.text for e in second) == "abb"


def test_score_returns_dataclasses_in_order(client: RnnClient) -> None:
    texts = ["hello", "hi there"]
    results = client.score("lstm", texts)
    assert all(isinstance(r, ScoreResult) for r in results)
    assert [r.num_tokens for r in results] == [len(t) - 1 for t in texts]
    assert results[1].tokens == tuple(texts[1][1:])
    assert client.score("lstm", "one text")[0].num_tokens == len("one text") - 1


def test_infill_forecast_models_reload(client: RnnClient) -> None:
    cands = client.infill("lstm", "the ", "ime", top_k=3)
    assert len(cands) == 3 and cands[0].probability > cands[1].probability
    result = client.forecast("sine-gru", [1.0, 2.0, 3.0], 4, return_fitted=True)
    assert isinstance(result, ForecastResult)
    assert result.forecast == (4.0, 5.0, 6.0, 7.0)
    assert result.fitted == (1.0, 2.0) and result.fitted_offset == 1
    models = client.list_models()
    assert [m.name for m in models] == ["lstm", "sine-gru"]
    info = client.get_model("lstm")
    assert info.version().state[0].shape == (1, -1, 32)
    assert info.version().hyperparameters["hidden"] == "32"
    reload = client.reload_models()
    assert reload.loaded == ("gru/2",) and reload.failed[0].startswith("bad/1")


def test_status_codes_become_exceptions_with_details(client: RnnClient) -> None:
    with pytest.raises(NotFound) as info:
        client.get_model("nope")
    assert info.value.code == "NOT_FOUND" and "nope" in info.value.details
    with pytest.raises(FailedPrecondition, match="language model"):
        client.forecast("lstm", [1.0], 2)
    with pytest.raises(FailedPrecondition):
        list(client.generate("bilstm", "ab"))


def test_error_in_the_middle_of_a_stream_is_raised_after_earlier_tokens(client, fake) -> None:
    fake[0].script.stream_failure = grpc.StatusCode.RESOURCE_EXHAUSTED
    fake[0].script.fail_after = 2
    seen = []
    with pytest.raises(ResourceExhausted) as info:
        for event in client.generate("lstm", "abc", max_tokens=5):
            seen.append(event.text)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert seen == ["c", "b"]


def test_unary_calls_retry_on_unavailable(client: RnnClient, fake) -> None:
    rec = fake[0]
    rec.script.failures["Score"] = [U, grpc.StatusCode.CANCELLED]  # a replica closing its port
    assert client.score("lstm", ["ab"])[0].num_tokens == 1
    assert rec.calls["Score"] == 3


def test_retries_stop_after_max_attempts(client: RnnClient, fake) -> None:
    rec = fake[0]
    rec.script.failures["ListModels"] = [U] * 10
    with pytest.raises(Unavailable):
        client.list_models()
    assert rec.calls["ListModels"] == FAST_RETRY.max_attempts


def test_other_errors_are_not_retried(client: RnnClient, fake) -> None:
    rec = fake[0]
    rec.script.failures["Score"] = [grpc.StatusCode.INVALID_ARGUMENT, U]
    with pytest.raises(InvalidArgument):
        client.score("lstm", ["ab"])
    assert rec.calls["Score"] == 1


def test_generate_without_failover_is_never_retried(client: RnnClient, fake) -> None:
    rec = fake[0]
    rec.script.failures["Generate"] = [U]
    with pytest.raises(Unavailable):
        list(client.generate("lstm", "ab", failover=False))
    assert rec.calls["Generate"] == 1


def test_no_retry_policy_makes_one_attempt(fake) -> None:
    rec, address = fake
    rec.script.failures["ListModels"] = [U]
    with RnnClient(address, retry=NO_RETRY) as c, pytest.raises(Unavailable):
        c.list_models()
    assert rec.calls["ListModels"] == 1


def test_deadline_exceeded_is_raised(client: RnnClient, fake) -> None:
    fake[0].script.hold = threading.Event()
    with pytest.raises(DeadlineExceeded):
        client.score("lstm", ["ab"], timeout=0.2)
    with pytest.raises(DeadlineExceeded):
        list(client.generate("lstm", "ab", timeout=0.2))


def test_bearer_token_is_sent_as_metadata(client: RnnClient, fake) -> None:
    client.list_models()
    list(client.generate("lstm", "ab", max_tokens=1))
    assert [m.get("authorization") for m in fake[0].metadata] == ["Bearer s3cret"] * 2


def test_token_with_a_trailing_newline_is_sent_trimmed(fake) -> None:
    """As the server trims its tokens: a token read from a file keeps working, instead of
    every call failing INTERNAL "Invalid metadata"."""
    with RnnClient(fake[1], token="s3cret\n") as c:
        c.list_models()
    assert fake[0].metadata[-1]["authorization"] == "Bearer s3cret"


def test_token_a_header_cannot_carry_is_refused_naming_it(fake, capsys) -> None:
    from rnnserve.client.cli import main

    with pytest.raises(ValueError, match="token: "):
        RnnClient(fake[1], token="s3\tcret")
    assert main(["--address", fake[1], "--token", "caf\u00e9", "models"]) == 64
    assert capsys.readouterr().err.startswith("error: token: ")
    assert sum(fake[0].calls.values()) == 0


def test_no_token_sends_no_authorization(fake) -> None:
    with RnnClient(fake[1]) as c:
        c.list_models()
    assert "authorization" not in fake[0].metadata[-1]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.generate("lstm", ""),
        lambda c: c.generate("", "ab"),
        lambda c: c.score("lstm", []),
        lambda c: c.infill("lstm", "", ""),
        lambda c: c.forecast("sine-gru", [1.0, float("nan")], 2),
        lambda c: c.forecast("sine-gru", [], 2),
        lambda c: c.forecast("sine-gru", [1.0], 0),
    ],
)
def test_obviously_bad_requests_fail_locally(client: RnnClient, fake, call) -> None:
    with pytest.raises(InvalidArgument):
        call(client)
    assert sum(fake[0].calls.values()) == 0


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([1.0, None, 2.0], "history: value 1 is None, not a number"),
        ([1.0, "x"], "history: value 1 is 'x', not a number"),
        ([1.0, 10**400], "history: value 1 is 1000"),
        ("123", "history: must be a sequence of numbers, not a string"),
    ],
)
def test_forecast_history_that_is_not_numbers_names_the_value(client, fake, history, message):
    """A gap (None) raised float()'s bare TypeError naming no index, and a string was read
    character by character ("123" forecast from the history [1, 2, 3])."""
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        client.forecast("sine-gru", history, 2)
    assert sum(fake[0].calls.values()) == 0


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (b"the time", "texts: must be a str or a list of str, not bytes"),
        (["the time", 42], "texts[1]: must be a str, not int"),
        ([None], "texts[0]: must be a str, not NoneType"),
    ],
)
def test_score_texts_that_are_not_text_name_the_text(client, fake, texts, message) -> None:
    """Protobuf's TypeError "bad argument type for built-in operation" named nothing (bytes
    were read as a list of ints)."""
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        client.score("lstm", texts)
    assert sum(fake[0].calls.values()) == 0


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.generate("lstm", "ab", max_tokens=2**40), "max_tokens"),
        (lambda c: c.generate("lstm", "ab", top_k=2**31), "top_k"),
        (lambda c: c.generate("lstm", "ab", temperature=0.5, seed=2**64), "seed"),
        (lambda c: c.generate("lstm", "ab", state_every=2**32), "state_every"),
        (lambda c: c.infill("lstm", "a", "b", top_k=2**31), "top_k"),
        (lambda c: c.forecast("sine-gru", [1.0], 2**31), "horizon"),
    ],
)
def test_integers_the_field_cannot_hold_name_the_field(client, fake, call, field) -> None:
    """Not protobuf's bare ValueError "Value out of range: N": InvalidArgument naming it."""
    with pytest.raises(
        InvalidArgument, match=rf"^INVALID_ARGUMENT: {field}: must be <= \d+, got \d+$"
    ):
        call(client)
    assert sum(fake[0].calls.values()) == 0


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.generate("lstm", "ab\udcff"), "prompt"),
        (lambda c: c.generate("lstm", "ab", stop=["x", "\ud800"]), r"stop\[1\]"),
        (lambda c: c.generate("ls\udcfftm", "ab"), "model"),
        (lambda c: c.score("lstm", ["fine", "\udcff\udcfe"]), r"texts\[1\]"),
        (lambda c: c.infill("lstm", "a", "\udfff"), "right"),
        (lambda c: c.get_model("lstm", "\ud800"), "version"),
    ],
)
def test_text_that_is_not_unicode_names_the_field(client, fake, call, field) -> None:
    """A lone surrogate (JSON's "\\ud800"; a command-line byte that is not UTF-8) raised
    protobuf's UnicodeEncodeError naming no field, and no RnnServeError."""
    with pytest.raises(InvalidArgument, match=rf"^INVALID_ARGUMENT: {field}: not valid Unicode"):
        call(client)
    assert sum(fake[0].calls.values()) == 0


def test_cli_text_that_is_not_utf8_exits_3_naming_the_argument(fake, capsys) -> None:
    from rnnserve.client.cli import main

    argv = ["--address", fake[1], "score", "--model", "lstm", "ok", "\udcff"]  # argv's b"\xff"
    assert main(argv) == 3
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: texts[1]: ")


def test_cli_integer_out_of_range_exits_3_naming_the_flag(fake, capsys) -> None:
    from rnnserve.client.cli import main

    argv = ["--address", fake[1], "generate", "--model", "lstm", "--prompt", "a"]
    assert main([*argv, "--max-tokens", "99999999999"]) == 3
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: max_tokens: ")


def test_cancelling_a_stream_stops_it(client: RnnClient) -> None:
    with client.generate("lstm", "abc", max_tokens=50) as stream:
        first = next(iter(stream))
    assert first.text == "c"
    assert stream.finish_reason is None


def _until(condition, limit: float = 10.0) -> bool:
    """Polls `condition` until true or `limit` seconds pass (a bound, not a timing claim)."""
    end = time.monotonic() + limit
    while not condition() and time.monotonic() < end:
        time.sleep(0.02)
    return condition()


def test_closing_the_client_ends_running_calls_with_cancelled(fake) -> None:
    """close() from another thread ends a stream being read and a unary call in flight with
    Cancelled; both took CANCELLED for a replica's, retried on the closed channel and raised
    grpc's ValueError "Cannot invoke RPC: Channel closed!"."""
    rec, address = fake
    rec.script.hold = threading.Event()  # every call waits on the server until released
    client = RnnClient(address, retry=FAST_RETRY)
    errors: dict[str, BaseException] = {}

    def call(name: str, fn) -> None:
        try:
            fn()
        except BaseException as exc:  # recorded for the asserts below
            errors[name] = exc

    threads = [
        threading.Thread(target=call, args=("stream", lambda: list(client.generate("lstm", "a")))),
        threading.Thread(target=call, args=("unary", client.list_models)),
    ]
    for t in threads:
        t.start()
    assert _until(lambda: rec.calls["Generate"] == rec.calls["ListModels"] == 1)
    client.close()
    for t in threads:
        t.join(10)
    assert set(errors) == {"stream", "unary"}
    for exc in errors.values():
        assert isinstance(exc, Cancelled), repr(exc)
    assert rec.calls["Generate"] == rec.calls["ListModels"] == 1  # neither went on


def test_a_retry_reaches_a_server_that_came_up_during_the_pause() -> None:
    """gRPC waits 1 s (growing to 120 s) before it redials an address it could not reach and
    fails every call meanwhile with the old error: the retries (0.1, 0.2, 0.4 s by default)
    all fell inside that wait, so a server back from a restart was never reached."""
    with socket.socket() as s:  # a port nothing listens on, until the first pause
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=0.25, jitter_floor=1)
    started: list[grpc.Server] = []

    def pause(seconds: float) -> None:
        if not started:
            started.append(fake_server.start(port=port)[0])
        time.sleep(seconds)

    try:
        with RnnClient(f"127.0.0.1:{port}", timeout=10, retry=policy) as c:
            c._sleep = pause
            assert [m.name for m in c.list_models()] == ["lstm", "sine-gru"]
    finally:
        for server in started:
            server.stop(grace=None)
    assert started  # the first attempt did fail


def test_a_closed_client_refuses_new_calls_with_cancelled(fake) -> None:
    """A call after close() raised grpc's ValueError "Cannot invoke RPC on closed channel!"
    (no RnnServeError), and wait_ready waited out its timeout for Unavailable."""
    client = RnnClient(fake[1], retry=FAST_RETRY)
    client.close()
    calls = [client.list_models, lambda: client.generate("lstm", "a"), client.wait_ready]
    for call in calls:
        with pytest.raises(Cancelled, match=r"^CANCELLED: Channel closed!$"):
            call()
    assert fake[0].calls == {}


def test_wait_ready_on_a_dead_address_raises_unavailable() -> None:
    with RnnClient("127.0.0.1:1") as c, pytest.raises(Unavailable):
        c.wait_ready(timeout=0.2)


def test_wait_ready_without_a_timeout_waits_for_the_server(client) -> None:
    """None waits as long as it takes, as the async client's does (it raised TypeError)."""
    client.wait_ready(timeout=None)


@pytest.mark.parametrize(
    "address", ["127.0.0.1:116087", "localhost:0", "[::1]:70000", "a:1,b:65536"]
)
def test_a_port_out_of_range_is_refused_not_wrapped(address: str) -> None:
    """gRPC keeps a port's low 16 bits: 127.0.0.1:116087 would reach a server on 50551."""
    with pytest.raises(ValueError, match=r"address: port \d+ of .* is not in 1\.\.65535"):
        RnnClient(address)


@pytest.mark.parametrize(
    "address", ["localhost:50051", "[::1]:50051", "::1", "localhost", "dns:///h:99999"]
)
def test_addresses_grpc_accepts_are_kept(address: str) -> None:
    with RnnClient(address) as c:
        assert c.addresses == [address]


def test_cli_port_out_of_range_exits_64(capsys) -> None:
    from rnnserve.client.cli import main

    assert main(["--address", "127.0.0.1:116087", "models"]) == 64
    assert (
        capsys.readouterr().err == "error: address: port 116087 of 127.0.0.1:116087 "
        "is not in 1..65535\n"
    )


@pytest.mark.parametrize("keepalive", [float("inf"), 1e10])
def test_a_huge_keepalive_means_rare_pings_not_an_overflow(fake, keepalive: float) -> None:
    """gRPC takes a C int of milliseconds; `--keepalive inf` used to end in OverflowError."""
    from rnnserve.client.cli import main

    with RnnClient(fake[1], keepalive=keepalive) as c:
        assert [m.name for m in c.list_models()] == ["lstm", "sine-gru"]
    assert main(["--address", fake[1], "--keepalive", str(keepalive), "models"]) == 0


@pytest.mark.parametrize("timeout", [1e10, 1e300])
def test_a_huge_timeout_means_no_deadline_not_an_instant_one(fake, timeout: float) -> None:
    """gRPC's deadline is int64 nanoseconds; past about 9.2e9 s it overflowed and every call
    failed DEADLINE_EXCEEDED at once."""
    from rnnserve.client.cli import main

    with RnnClient(fake[1], timeout=timeout) as c:
        assert [m.name for m in c.list_models()] == ["lstm", "sine-gru"]
        assert "".join(e.text for e in c.generate("lstm", "ab", max_tokens=2)) == "ba"
    argv = ["--address", fake[1], "--timeout", str(timeout)]
    assert main([*argv, "models"]) == 0
    assert main([*argv, "generate", "--model", "lstm", "--prompt", "ab"]) == 0


def _in_thread(fn) -> tuple[threading.Thread, dict[str, object]]:
    """Runs `fn` in a daemon thread; its result or exception lands in the dict it returns."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # recorded for the test's asserts
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_close_during_the_pause_before_a_retry_ends_the_call_with_cancelled(fake) -> None:
    """close() from another thread while a unary call waited to retry: the pause ran on (up
    to max_backoff), then the retry on the closed channel raised grpc's ValueError "Cannot
    invoke RPC on closed channel!", which no `except RnnServeError` catches."""
    rec, address = fake
    rec.script.failures["ListModels"] = [U]
    slow = RetryPolicy(max_attempts=2, initial_backoff=600, max_backoff=600, jitter_floor=1)
    client = RnnClient(address, timeout=None, retry=slow)
    thread, out = _in_thread(client.list_models)
    assert _until(lambda: rec.calls["ListModels"] == 1)
    client.close()
    thread.join(10)
    assert not thread.is_alive(), "the call waited out its pause"
    assert isinstance(out.get("error"), Cancelled), out
    assert str(out["error"]) == "CANCELLED: Channel closed!"
    assert rec.calls["ListModels"] == 1


def test_close_ends_a_wait_ready_with_cancelled() -> None:
    """wait_ready(None) on a replica that never comes up waited forever after close() from
    another thread (with a timeout: waited it out, then said "no server")."""
    client = RnnClient("127.0.0.1:1")
    thread, out = _in_thread(lambda: client.wait_ready(None))
    # either order must end in Cancelled; a moment inside wait_ready first only spares grpc's
    # connectivity thread a race of its own (a watch begun on a channel just closed)
    time.sleep(0.3)
    client.close()
    thread.join(10)
    assert not thread.is_alive(), "wait_ready went on waiting after close()"
    assert isinstance(out.get("error"), Cancelled), out


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_a_timeout_that_is_no_deadline_is_refused_when_the_client_is_made(timeout) -> None:
    """RnnClient(timeout=0) was accepted; every call then raised the ValueError."""
    from rnnserve.client import AsyncRnnClient

    for make in (RnnClient, AsyncRnnClient):
        with pytest.raises(ValueError, match=r"timeout must be > 0 seconds"):
            make("127.0.0.1:1", timeout=timeout)
