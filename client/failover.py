"""Generate failover: continue a stream from its last checkpoint on another replica.

Why: a recurrent model's whole context is a few kilobytes of state, which the server hands
out every `state_every` tokens as a signed resume token (a "checkpoint"; the message it
arrives on ends exactly there). When a replica dies mid-stream, the client asks another one
to continue from that checkpoint. The continuation is exact (same state, same random
sequence, same stop-string bookkeeping), so the tokens the caller already received after
the checkpoint come again: `StreamLedger` checks they match and passes on only what is new.
The caller sees one uninterrupted stream.

This module is the pure part shared by both clients: which errors mean "the replica or the
connection died", the ledger, and the request for each attempt.
"""

from __future__ import annotations

import json
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rnnserve.client.convert import finish_reason
from rnnserve.client.errors import Cancelled, DataLoss, RnnServeError, Unavailable
from rnnserve.client.results import TokenEvent
from rnnserve.client.retry import RetryPolicy
from rnnserve.v1 import rnnserve_pb2 as pb

# tokens between checkpoints when a stream may fail over: on a tiny model the server spends
# about 9% more CPU per token at 64, 15% at 16 (bench/results/failover.json)
DEFAULT_STATE_EVERY = 64
_MAX_STATE_EVERY = 2**32 - 1  # GenerateRequest.state_every is a uint32

_TOKEN_HEAD = struct.Struct(">2sBI")  # a resume token's magic, version and header length

# A connection reset through a proxy (Envoy resets the client's stream when its upstream
# dies after the response started) arrives as INTERNAL or UNKNOWN with one of these.
_RESET_MARKS = ("rst_stream", "stream removed", "connection reset", "socket closed", "goaway",
                "broken pipe", "upstream reset", "connection terminated")  # fmt: skip

# How a replica refuses a resume token signed with a key it does not hold (server/resume.py):
# mid-rotation (docs/operations.md), a replica still on the old key alone refuses the new
# key's checkpoints that the rotated replicas accept.
OTHER_KEY_REFUSAL = "resume token was signed with a different --state-key"


def is_replica_failure(error: RnnServeError, *, resuming: bool = False) -> bool:
    """UNAVAILABLE (replica gone, refusing while it drains, connection failed), CANCELLED that
    the caller did not ask for (a replica closing its port, or its --grace running out: the
    caller's own cancel() is checked before this), or a stream reset by the peer or a proxy:
    worth continuing elsewhere. Everything else is an answer, except while `resuming` (the
    attempt is one the stream failed over to, and the caller already holds part of the
    stream): then RESOURCE_EXHAUSTED (this replica is full, likeliest just when it absorbs a
    dead one's streams), NOT_FOUND (this replica lacks the model or the checkpoint's
    version, as during a rolling deploy) and FAILED_PRECONDITION (the version is NOT_SERVING
    here: it failed to load on this replica; or it serves other weights under that number)
    and INVALID_ARGUMENT for a checkpoint signed with a key this replica lacks (a key
    rotation rolling out: the next replica may hold it) say something about this replica,
    not about the request: the tokens delivered prove another replica served it."""
    if error.code in ("UNAVAILABLE", "CANCELLED"):
        return True
    if resuming and error.code in ("RESOURCE_EXHAUSTED", "NOT_FOUND", "FAILED_PRECONDITION"):
        return True
    if resuming and error.code == "INVALID_ARGUMENT" and OTHER_KEY_REFUSAL in error.details:
        return True
    if error.code in ("INTERNAL", "UNKNOWN"):
        details = error.details.lower()
        return any(mark in details for mark in _RESET_MARKS)
    return False


def pause_before_next_attempt(
    error: RnnServeError,
    failures: int,
    *,
    failover: bool,
    cancelled: bool,
    retry: RetryPolicy,
    addresses: Sequence[str],
    deadline: float | None,
    resuming: bool = False,
    refusal: RnnServeError | None = None,
) -> float:
    """Seconds to wait before the stream's next attempt, or raises: `error` itself when it is
    an answer (not a replica failure; `resuming` as in is_replica_failure), failover is off,
    the stream was cancelled or the deadline would pass; Unavailable after
    `retry.max_attempts` failures in a row (a failure counts as "in a row" until an attempt
    delivers something new). `refusal`: the last answer a live replica gave (StreamLedger),
    named in that Unavailable when the last attempt failed otherwise (a dead replica)."""
    if cancelled or not failover or not is_replica_failure(error, resuming=resuming):
        raise error
    if failures >= retry.max_attempts:
        tried = f"(replicas {', '.join(addresses)}); last error: {error}"
        if refusal is not None and refusal is not error:
            tried += f"; last refusal by a live replica: {refusal}"
        if failures == 1:
            # max_attempts 1: the stream never failed over, so `resuming` cannot say whether
            # it delivered anything ("could not be started" after hundreds of tokens misled)
            raise Unavailable(f"the stream failed and retry.max_attempts=1 allows no retry {tried}")
        # by now the stream has failed over, so `resuming` says whether it delivered anything
        what = "resumed" if resuming else "started"
        raise Unavailable(
            f"the stream could not be {what}: {failures} attempts in a row failed {tried}"
        )
    # the first move to another replica needs no pause: that replica is not the one that
    # failed; a retry on the same address (a load balancer), or a second failure, waits
    first_elsewhere = failures == 1 and len(addresses) > 1
    pause = 0.0 if first_elsewhere else retry.backoff(failures)
    if deadline is not None and time.monotonic() + pause >= deadline:
        raise error
    return pause


def cancelled_during_pause() -> Cancelled:
    return Cancelled("the stream was cancelled while it waited to fail over")


def checked_state_every(state_every: int) -> int:
    """A client's default checkpoint interval, refused at construction naming the argument
    (else every generate() failed with protobuf's "Value out of range")."""
    if not 0 <= state_every <= _MAX_STATE_EVERY:
        raise ValueError(f"state_every must be in [0, {_MAX_STATE_EVERY}], got {state_every}")
    return state_every


def with_failover_defaults(request: pb.GenerateRequest, state_every: int) -> None:
    """Makes a request continuable: checkpoints every `state_every` tokens, and a seed of the
    client's own for sampled requests without one (so a restart before the first checkpoint
    also repeats the same tokens). A continuation of a checkpoint gets none: its seed is in
    the checkpoint, and the server refuses a seed that differs from it."""
    if not request.state_every:
        request.state_every = state_every
    sampled = request.sampling.temperature > 0 and not request.sampling.HasField("seed")
    if sampled and not continues_a_checkpoint(request):
        request.sampling.seed = secrets.randbits(63)


def with_the_states_version(request: pb.GenerateRequest) -> None:
    """A request that goes on from a resume token and names no version asks for the one the
    token was made by, as failover's own continuations do (StreamLedger.attempt): a server
    whose default version differs refused it ("belongs to m/2, not m/3") even when it served
    that version too. With failover or without: the state fits that version only."""
    if request.state and not request.version:
        request.version = state_version(request.state, request.model)


def continues_a_checkpoint(request: pb.GenerateRequest) -> bool:
    """Whether the request continues a stream from a checkpoint (a token with progress and no
    prompt); anything unreadable is no."""
    if request.prompt:
        return False
    header = _token_header(request.state)
    return header is not None and "stream" in header


def checkpoint_version(token: bytes) -> str:
    """The model version a resume token was made by ("" when it does not say): the version a
    continuation must ask for, since a replica checks the token against the version it
    resolves (its default for "")."""
    header = _token_header(token)
    version = header.get("version") if header is not None else None
    return version if isinstance(version, str) else ""


def state_version(token: bytes, model: str) -> str:
    """checkpoint_version, for a token made by `model` only ("" otherwise): another model's
    token is refused anyway, and naming the server's refusal ("belongs to lstm/1, not gru/1")
    is clearer than a NOT_FOUND for a version the asked model may lack."""
    header = _token_header(token)
    made_by_model = header is not None and header.get("model") == model
    return checkpoint_version(token) if made_by_model else ""


def _token_header(token: bytes) -> dict | None:
    """A resume token's header (server/resume.py: b"RS", version u8, header length u32,
    header JSON with "model", "version" and, for checkpoints, "stream"), unverified: the
    server checks the signature. None when it is not readable."""
    if len(token) < _TOKEN_HEAD.size or not token.startswith(b"RS"):
        return None
    _, _, length = _TOKEN_HEAD.unpack_from(token)
    try:
        header = json.loads(token[_TOKEN_HEAD.size : _TOKEN_HEAD.size + length])
    except (ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


class StreamDiverged(DataLoss):
    """A resumed stream repeated tokens that differ from those already delivered (replicas
    serving different models under one name, or a bug): the stream cannot go on."""


@dataclass
class StreamLedger:
    """What the caller has received, and the last checkpoint; turns each attempt's messages
    into events that carry only what is new."""

    request: pb.GenerateRequest
    token_ids: list[int] = field(default_factory=list)  # delivered, in order
    text: list[str] = field(default_factory=list)  # delivered parts
    logprob: float = 0.0  # delivered, summed
    checkpoint: bytes | None = None
    version: str = ""  # the model version the first attempt was served by ("" if unsaid)
    _at: tuple[int, int, float] = (0, 0, 0.0)  # tokens, characters, logprob at the checkpoint
    _cursor: tuple[int, int, float] = (0, 0, 0.0)  # the same, for the current attempt
    _chars: int = 0  # len("".join(text))
    refusal: RnnServeError | None = None  # the last answer of a live replica (failed())

    def failed(self, error: RnnServeError) -> None:
        """Notes an attempt's error: the last refusal by a live replica (it lacks the model,
        the version or the key, or is full) is what a final Unavailable should name, even
        when a dead replica failed last."""
        if is_replica_failure(error, resuming=True) and not is_replica_failure(error):
            self.refusal = error

    @property
    def delivered(self) -> bool:
        """Whether the caller already holds part of the stream."""
        return bool(self.token_ids) or self._chars > 0

    def attempt(self) -> pb.GenerateRequest:
        """The request for the next attempt: the original one until there is a checkpoint,
        then a continuation of the checkpoint (no prompt, same parameters, and the version
        the checkpoint was made by unless the caller pinned one: with version="" a replica
        whose default version differs would refuse it). A restart before the first
        checkpoint asks for the version that served the first attempt: another replica's
        default may be a newer model, whose tokens would not repeat the delivered ones."""
        self._cursor = self._at
        if self.checkpoint is None:
            if self.request.version or not self.version:
                return self.request
            restart = pb.GenerateRequest()
            restart.CopyFrom(self.request)
            restart.version = self.version
            return restart
        continuation = pb.GenerateRequest()
        continuation.CopyFrom(self.request)
        continuation.prompt = ""
        continuation.state = self.checkpoint
        if not continuation.version:
            continuation.version = checkpoint_version(self.checkpoint)
        return continuation

    def take(self, msg: pb.GenerateResponse) -> TokenEvent | None:
        """One message of the current attempt -> the event for the caller (None when the
        message only repeats what the caller has). Raises StreamDiverged on a mismatch."""
        if msg.model_version and not self.version:
            self.version = msg.model_version
        tokens, chars, lp = self._cursor
        ids = list(msg.token_ids) or ([msg.token_id] if msg.token_id >= 0 else [])
        known = len(self.token_ids)
        seen = self.token_ids[tokens : tokens + len(ids)]
        if ids[: len(seen)] != seen:
            raise StreamDiverged(
                f"the resumed stream repeated tokens {ids[: len(seen)]} where {seen} were "
                f"delivered (after token {tokens}): do all replicas serve the same model?"
            )
        new_ids = ids[max(0, known - tokens) :]
        shown = "".join(self.text)[chars:] if chars < self._chars else ""
        same = msg.text[: len(shown)]
        if same != shown[: len(same)]:
            raise StreamDiverged(f"the resumed stream's text {same!r} differs from {shown!r}")
        new_text = msg.text[len(shown) :]
        tokens, chars, lp = tokens + len(ids), chars + len(msg.text), lp + msg.logprob
        self._cursor = (tokens, chars, lp)
        if msg.state and not msg.finish_reason:
            self.checkpoint, self._at = msg.state, self._cursor
        last = msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        if not (new_ids or new_text or last):
            return None
        self.refusal = None  # progress: failures (and refusals) count in a row from here
        new_lp = lp - self.logprob if new_ids else 0.0  # only the new tokens' share
        self.token_ids += new_ids
        self.text.append(new_text)
        self._chars += len(new_text)
        if new_ids:
            self.logprob = lp
        return TokenEvent(
            text=new_text,
            token_id=new_ids[-1] if new_ids else -1,
            token_ids=tuple(new_ids),
            logprob=new_lp,
            finish_reason=finish_reason(msg.finish_reason),
            state=msg.state or None,
        )
