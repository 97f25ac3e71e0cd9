"""Resume tokens: round trip, and every kind of tampering is a BadRequest on `state`."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from rnnserve.artifact.manifest import StateSpec
from rnnserve.server.errors import BadRequest
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
    [b"[" * 100_000, b'{"kid": ' + b"[" * 100_000, b"[1]", b'{"kid": 1}', b"\xff"],
    ids=["deeply-nested", "deeply-nested-kid", "not-an-object", "kid-not-a-string", "not-utf8"],
)
def test_forged_headers_are_rejected_before_the_signature(head: bytes) -> None:
    """The header is read before the MAC (to pick the key), so anyone can send any JSON
    there: it must be a BadRequest, never an internal error."""
    with pytest.raises(BadRequest, match="malformed") as err:
        StateSigner("secret").verify(_forged(head), "lstm", "1", SPECS, vocab_size=10)
    assert err.value.field == "state"


def test_other_key_model_or_version_is_rejected() -> None:
    token = StateSigner("secret").sign("lstm", "1", _state(), 7)
    with pytest.raises(BadRequest, match="different --state-key"):
        StateSigner("other").verify(token, "lstm", "1", SPECS, vocab_size=10)
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
