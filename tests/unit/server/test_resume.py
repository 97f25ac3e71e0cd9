"""Resume tokens: round trip, and every kind of tampering is a BadRequest on `state`."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

import numpy as np
import pytest

from rnnserve.artifact.manifest import StateSpec
from rnnserve.client.failover import OTHER_KEY_REFUSAL
from rnnserve.server.errors import BadRequest, OtherWeights
from rnnserve.server.resume import StateSigner

SPECS = [
    StateSpec("h", "h_in", "h_out", [2, -1, 3], 1),
    StateSpec("c", "c_in", "c_out", [2, -1, 3], 1),
]


def _state() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((2, 1, 3)).astype(np.float32) for _ in SPECS]


def test_round_trip_restores_state_and_last_token() -> None:
    signer = StateSigner("secret")
    state = _state()
    token = signer.sign("lstm", "1", state, 7)
    resumed = StateSigner("secret").verify(token, "lstm", "1", SPECS, vocab_size=10)
    assert resumed.last_token == 7
    for a, b in zip(resumed.state, state, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-1],
        lambda t: t[:10],
        lambda t: b"",
        lambda t: t[:20] + bytes([t[20] ^ 1]) + t[21:],
        lambda t: t[:-1] + bytes([t[-1] ^ 1]),
    ],
    ids=["truncated-mac", "truncated", "empty", "flipped-body", "flipped-mac"],
)
def test_tampered_tokens_are_rejected(mutate) -> None:
    signer = StateSigner("secret")
    token = signer.sign("lstm", "1", _state(), 7)
    with pytest.raises(BadRequest) as err:
        signer.verify(mutate(token), "lstm", "1", SPECS, vocab_size=10)
    assert err.value.field == "state"


def _forged(head: bytes) -> bytes:
    """A version 2 token anyone can make: any header, any MAC."""
    return struct.pack(">2sBI", b"RS", 2, len(head)) + head + bytes(32)


@pytest.mark.parametrize(
    "head",
    [
        b"[" * 100_000,
        b'{"kid": ' + b"[" * 100_000,
        b"[1]",
        b'{"kid": 1}',
        b"\xff",
        json.dumps({"kid": "a\n" * 100_000}).encode(),  # was echoed whole in the message
    ],
    ids=[
        "deeply-nested",
        "deeply-nested-kid",
        "not-an-object",
        "kid-not-a-string",
        "not-utf8",
        "kid-not-a-key-id",
    ],
)
def test_forged_headers_are_rejected_before_the_signature(head: bytes) -> None:
    """The header is read before the MAC (to pick the key), so anyone can send any JSON
    there: it must be a BadRequest, never an internal error."""
    with pytest.raises(BadRequest, match="malformed") as err:
        StateSigner("secret").verify(_forged(head), "lstm", "1", SPECS, vocab_size=10)
    assert err.value.field == "state"


def test_other_key_model_or_version_is_rejected() -> None:
    token = StateSigner("secret").sign("lstm", "1", _state(), 7)
    with pytest.raises(BadRequest, match="different --state-key") as err:
        StateSigner("other").verify(token, "lstm", "1", SPECS, vocab_size=10)
    assert OTHER_KEY_REFUSAL in str(err.value)  # how failover tells it from other refusals
    with pytest.raises(BadRequest, match="belongs to lstm/1"):
        StateSigner("secret").verify(token, "gru", "1", SPECS, vocab_size=10)
    with pytest.raises(BadRequest, match="belongs to lstm/1"):
        StateSigner("secret").verify(token, "lstm", "2", SPECS, vocab_size=10)


def test_shape_mismatch_is_rejected() -> None:
    signer = StateSigner("secret")
    token = signer.sign("lstm", "1", _state(), 7)
    other = [StateSpec("h", "h_in", "h_out", [2, -1, 4], 1), SPECS[1]]
    with pytest.raises(BadRequest, match="malformed"):
        signer.verify(token, "lstm", "1", other, vocab_size=10)


# -- --state-max-age: tokens carry `iat` (when they were made) and may expire ----------------
NOW = 1_700_000_000  # 2023-11-14T22:13:20Z


def _at(when: float):
    """A clock for the signer: tests control time instead of sleeping."""
    return lambda: when


def _header(token: bytes) -> dict:
    (length,) = struct.unpack_from(">I", token, 3)
    return json.loads(token[7 : 7 + length])


def test_tokens_record_when_they_were_made() -> None:
    token = StateSigner("secret", clock=_at(NOW + 0.9)).sign("lstm", "1", _state(), 7)
    assert _header(token)["iat"] == NOW
    assert token[2] == 2  # same version: servers that predate `iat` still read it


def test_a_token_within_the_max_age_is_accepted() -> None:
    token = StateSigner("secret", clock=_at(NOW)).sign("lstm", "1", _state(), 7)
    for now in (NOW, NOW + 3600):  # the boundary itself is still within the age
        signer = StateSigner("secret", max_age=3600, clock=_at(now))
        assert signer.verify(token, "lstm", "1", SPECS, vocab_size=10).last_token == 7


def test_a_fresh_token_made_late_in_a_second_is_not_expired() -> None:
    """`iat` is whole seconds: a token made at .95 and checked 0.1 s later, in the next
    second, looked over a second old and --state-max-age 1 refused it as expired."""
    token = StateSigner("secret", clock=_at(NOW + 0.95)).sign("lstm", "1", _state(), 7)
    signer = StateSigner("secret", max_age=1, clock=_at(NOW + 1.05))
    assert signer.verify(token, "lstm", "1", SPECS, vocab_size=10).last_token == 7
    later = StateSigner("secret", max_age=1, clock=_at(NOW + 2.05))  # over a second old
    with pytest.raises(BadRequest, match="expired at"):
        later.verify(token, "lstm", "1", SPECS, vocab_size=10)


def test_an_old_token_is_refused_with_when_it_expired() -> None:
    token = StateSigner("secret", clock=_at(NOW)).sign("lstm", "1", _state(), 7)
    signer = StateSigner("secret", max_age=3600, clock=_at(NOW + 3601))
    with pytest.raises(BadRequest, match="expired at 2023-11-14T23:13:20Z") as err:
        signer.verify(token, "lstm", "1", SPECS, vocab_size=10)
    assert err.value.field == "state"
    assert "--state-max-age 3600" in str(err.value)
    # without a max age the same token never expires
    later = StateSigner("secret", clock=_at(NOW + 10**8))
    assert later.verify(token, "lstm", "1", SPECS, vocab_size=10).last_token == 7


def test_a_token_from_the_future_is_refused_past_the_clock_skew() -> None:
    token = StateSigner("secret", clock=_at(NOW + 61)).sign("lstm", "1", _state(), 7)
    signer = StateSigner("secret", max_age=3600, clock=_at(NOW))
    with pytest.raises(BadRequest, match="made in the future") as err:
        signer.verify(token, "lstm", "1", SPECS, vocab_size=10)
    assert err.value.field == "state"
    skewed = StateSigner("secret", clock=_at(NOW + 60)).sign("lstm", "1", _state(), 7)
    assert signer.verify(skewed, "lstm", "1", SPECS, vocab_size=10).last_token == 7


def _without_iat(key: bytes) -> bytes:
    """A version 2 token as made before `iat` existed (re-signed without it)."""
    token = StateSigner(key).sign("lstm", "1", _state(), 7)
    header = _header(token)
    payload = token[7 + struct.unpack_from(">I", token, 3)[0] : -32]
    del header["iat"]
    head = json.dumps(header).encode()
    body = struct.pack(">2sBI", b"RS", 2, len(head)) + head + payload
    return body + hmac.new(key, body, hashlib.sha256).digest()


def test_tokens_without_a_time_depend_on_the_setting() -> None:
    token = _without_iat(b"secret")
    assert StateSigner("secret").verify(token, "lstm", "1", SPECS, 10).last_token == 7
    with pytest.raises(BadRequest, match="carries no creation time") as err:
        StateSigner("secret", max_age=3600).verify(token, "lstm", "1", SPECS, 10)
    assert err.value.field == "state"
    assert "--state-max-age" in str(err.value)


def test_a_future_token_with_a_huge_time_is_still_a_bad_request() -> None:
    """A replica with a broken clock can sign any `iat`: the message must not crash."""
    token = StateSigner("secret", clock=_at(1e20)).sign("lstm", "1", _state(), 7)
    with pytest.raises(BadRequest, match="made in the future"):
        StateSigner("secret", max_age=60, clock=_at(NOW)).verify(token, "lstm", "1", SPECS, 10)


def test_a_token_is_bound_to_the_weights_that_made_it() -> None:
    """A version number reused for a new export (a rolling update that kept `lstm/1`): the
    token names the first 16 hex digits of onnx_sha256, and a replica whose lstm/1 has other
    weights refuses it as FAILED_PRECONDITION (OtherWeights), which failover passes over,
    instead of continuing the stream on other weights."""
    old, new = "ab" * 32, "cd" * 32
    signer = StateSigner("secret")
    token = signer.sign("lstm", "1", _state(), 7, weights=old)
    assert signer.verify(token, "lstm", "1", SPECS, 10, weights=old.upper()).last_token == 7
    with pytest.raises(OtherWeights) as err:
        signer.verify(token, "lstm", "1", SPECS, 10, weights=new)
    assert err.value.code.name == "FAILED_PRECONDITION" and "other weights" in str(err.value)
    # not checked where either side has no digest: tokens of older servers, foreign models
    assert signer.verify(token, "lstm", "1", SPECS, 10).last_token == 7
    unbound = signer.sign("lstm", "1", _state(), 7)
    assert signer.verify(unbound, "lstm", "1", SPECS, 10, weights=new).last_token == 7
