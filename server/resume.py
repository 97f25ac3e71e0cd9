"""Resume tokens: a stream's recurrent state and progress, signed so any replica can trust it.

Layout (all integers big-endian):
    b"RS" | version u8 | header length u32 | header JSON | tensor bytes | HMAC-SHA256 (32)
The header binds the token to the model name and version and describes each state tensor
(name, dtype, shape) plus `last_token`, the sampled token the model has not consumed yet:
resuming feeds it first, so the continuation is exactly what the stream would have produced.
Version 2 adds `kid` (which key signed it, so a replica with other keys says so) and `stream`
(a `Progress`: the sampler's seed and how many uniforms it used, tokens made of max_tokens,
held-back stop-string text, and the sampling/stop parameters a continuation must repeat).
Version 1 tokens (no kid, no progress) still verify: they resume the state only.
Version 2 headers may carry `weights`, the first 16 hex digits of the model's onnx_sha256: a
token is refused (OtherWeights) by a replica whose model under that name and version has
other weights, as when a version number is reused for a new export during a rolling update;
tokens without it (older servers, models with no digest) are not checked.
Version 2 headers also carry `iat`, when the token was made (integer seconds since the epoch;
servers that predate it ignore the key). With a max age (--state-max-age) a token older than
that, made more than CLOCK_SKEW seconds in the future, or with no `iat` (made before it
existed) is refused; with none (0) tokens never expire.
The HMAC covers everything before it. It is made with the first key of --state-key and
--state-key-previous; verification accepts any of them (key rotation).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from rnnserve.artifact.manifest import StateSpec
from rnnserve.server.errors import BadRequest, OtherWeights

MAGIC = b"RS"
TOKEN_VERSION = 2
READABLE_VERSIONS = (1, 2)
_MAC_LEN = 32
_HEAD = struct.Struct(">2sBI")
_MAX_HEADER = 1 << 20
_KID = re.compile(r"[0-9a-f]{16}")  # what key_id() makes
WEIGHTS_DIGITS = 16  # of the onnx_sha256 a token names: 64 bits tell exports apart
CLOCK_SKEW = 60  # seconds a token's `iat` may be ahead of this replica's clock (replica drift)


@dataclass(frozen=True)
class Progress:
    """Where a stream stands at a checkpoint: what another replica needs to continue it
    exactly (the state alone continues a greedy stream but not its count, its random
    sequence or a stop string that started before the checkpoint)."""

    tokens: int  # generated so far, counted from the original request
    max_tokens: int
    seed: int  # the sampler's seed (the server's own when the request gave none)
    uniforms: int  # uniforms of that seed's sequence used so far
    held: str  # text held back because it may start a stop string
    temperature: float
    top_k: int
    top_p: float
    stop: tuple[str, ...]


@dataclass
class Resumed:
    """A verified token: state tensors (batch of 1), the token to feed first, and the
    stream's progress (None for version 1 tokens)."""

    state: list[np.ndarray]
    last_token: int
    progress: Progress | None = None


def key_id(key: bytes) -> str:
    """A public name for a key (an HMAC of a constant): tells keys apart, reveals nothing."""
    return hmac.new(key, b"rnnserve resume key id", hashlib.sha256).hexdigest()[:16]


class StateSigner:
    """Makes resume tokens with the first key and checks them with any of the keys; with a
    max_age (seconds, 0 = never) refuses tokens older than that. `clock` is injectable so
    expiry can be tested without waiting."""

    def __init__(
        self,
        key: str | bytes = "",
        previous: Sequence[str | bytes] = (),
        max_age: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        keys = [k.encode() if isinstance(k, str) else k for k in (key, *previous)]
        keys[0] = keys[0] or secrets.token_bytes(32)
        self.keys = [k for k in keys if k]
        self.key = self.keys[0]
        self._by_id = {key_id(k): k for k in self.keys}
        self.kid = key_id(self.key)
        self._shapes: dict[tuple, list[dict]] = {}
        self.max_age = max_age
        self.clock = clock

    @staticmethod
    def _mac(key: bytes, body: bytes) -> bytes:
        return hmac.digest(key, body, "sha256")

    def _describe(self, tensors: list[np.ndarray]) -> list[dict]:
        """Each tensor's dtype and shape, cached: a model's state always looks the same."""
        key = tuple((t.dtype.num, t.shape) for t in tensors)
        meta = self._shapes.get(key)
        if meta is None:
            meta = [{"dtype": str(t.dtype), "shape": list(t.shape)} for t in tensors]
            self._shapes[key] = meta
        return meta

    def sign(
        self,
        model: str,
        version: str,
        state: list[np.ndarray],
        last_token: int,
        progress: Progress | None = None,
        weights: str = "",
    ) -> bytes:
        """`weights`: the model's onnx_sha256 ("" = none to bind)."""
        tensors = [np.ascontiguousarray(t) for t in state]
        header: dict = {
            "model": model,
            "version": version,
            "kid": self.kid,
            "iat": int(self.clock()),
            "last_token": int(last_token),
            "tensors": self._describe(tensors),
        }
        if weights:
            header["weights"] = weights[:WEIGHTS_DIGITS].lower()
        if progress is not None:
            header["stream"] = vars(progress)  # flat fields: no deep copy (checkpoints are hot)
        head = json.dumps(header, separators=(",", ":")).encode()
        body = _HEAD.pack(MAGIC, TOKEN_VERSION, len(head)) + head
        body += b"".join(t.tobytes() for t in tensors)
        return body + self._mac(self.key, body)

    def verify(
        self,
        token: bytes,
        model: str,
        version: str,
        specs: list[StateSpec],
        vocab_size: int,
        weights: str = "",
    ) -> Resumed:
        """Checks signature, version, binding and shapes; BadRequest("state", why) otherwise,
        OtherWeights when the token names other weights than `weights` (the onnx_sha256)."""
        if len(token) < _HEAD.size + _MAC_LEN:
            raise BadRequest("state", "resume token is truncated")
        body, mac = token[:-_MAC_LEN], token[-_MAC_LEN:]
        magic, tv, head_len = _HEAD.unpack_from(body)
        if magic != MAGIC:
            raise BadRequest("state", "is not a resume token")
        if tv not in READABLE_VERSIONS:
            raise BadRequest(
                "state",
                f"unsupported resume token version {tv} (this server reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}): it was made by a newer rnn-server",
            )
        self._check_mac(body, mac, tv, head_len)
        try:
            header = json.loads(body[_HEAD.size : _HEAD.size + head_len])
            payload = body[_HEAD.size + head_len :]
            if header["model"] != model or header["version"] != version:
                raise BadRequest(
                    "state",
                    f"resume token belongs to {header['model']}/"
                    f"{header['version']}, not {model}/{version}",
                )
            made_by = header.get("weights")
            if made_by and weights and made_by != weights[:WEIGHTS_DIGITS].lower():
                raise OtherWeights(
                    f"state: resume token was made by other weights of {model}/{version} "
                    f"({made_by}..., this replica serves {weights[:WEIGHTS_DIGITS]}...): a "
                    "new export needs a new version number; continue on a replica that "
                    "serves the token's weights, or start a new stream"
                )
            if self.max_age:
                self._check_age(header.get("iat"))
            tensors = _tensors(payload, header["tensors"], specs)
            last = int(header["last_token"])
            if not 0 <= last < vocab_size:
                raise ValueError("last_token out of range")
            progress = _progress(header["stream"]) if "stream" in header else None
        except (BadRequest, OtherWeights):
            raise
        # OverflowError: int() of an infinity, float() of a 400-digit integer; RecursionError:
        # a deeply nested header (version 1 tokens reach json.loads only here)
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise BadRequest("state", f"resume token is malformed: {exc}") from exc
        return Resumed(tensors, last, progress)

    def _check_age(self, iat: object) -> None:
        """Refuses a token older than max_age, or made in the future past CLOCK_SKEW (like a
        JWT's `exp` and `iat`): the message says when and which flag decided it."""
        if iat is None:
            raise BadRequest(
                "state",
                "resume token carries no creation time (it was made by an rnn-server that "
                "predates --state-max-age), so this replica, which refuses tokens older than "
                f"--state-max-age {self.max_age:.15g} s, cannot tell its age: start a new stream",
            )
        if type(iat) is not int:
            raise ValueError("iat is not an integer")
        now = self.clock()
        if iat > now + CLOCK_SKEW:
            raise BadRequest(
                "state",
                f"resume token was made in the future ({_when(iat)}, {iat - math.floor(now)} s "
                f"ahead of this replica's clock, more than the {CLOCK_SKEW} s allowed): check "
                "the replicas' clocks",
            )
        # in whole seconds, as `iat` is: now - iat counted a token made at x.95 and checked
        # at x+1.05 as over a second old, so --state-max-age 1 refused tokens 0.1 s old
        if math.floor(now) - iat > self.max_age:
            raise BadRequest(
                "state",
                f"resume token expired at {_when(iat + self.max_age)} (made {_when(iat)}; "
                f"--state-max-age {self.max_age:.15g} s): start a new stream",
            )

    def _check_mac(self, body: bytes, mac: bytes, tv: int, head_len: int) -> None:
        """Finds the key the token names (version 2) or tries every key (version 1)."""
        candidates = self.keys
        if tv >= 2:
            kid = _key_id_of(body, head_len)
            if kid not in self._by_id:
                # failover passes such a replica over by this text (client/failover.py
                # OTHER_KEY_REFUSAL): during a key rotation the next replica may hold the key
                raise BadRequest(
                    "state",
                    f"resume token was signed with a different --state-key (key id {kid}; "
                    f"this replica accepts {', '.join(self._by_id)}): give every replica the "
                    "same --state-key, and during a key rotation list the old key in "
                    "--state-key-previous",
                )
            candidates = [self._by_id[kid]]
        if not any(hmac.compare_digest(mac, self._mac(k, body)) for k in candidates):
            why = "forged or corrupted" if tv >= 2 else "forged, corrupted, or another --state-key"
            raise BadRequest("state", f"resume token signature is invalid ({why})")


def _when(seconds: float) -> str:
    """A UTC time as ISO 8601, or plain seconds when out of datetime's range."""
    try:
        return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # round(): "{:.0f}" of a huge int overflows
        return f"{round(seconds)} s since the epoch"


def _key_id_of(body: bytes, head_len: int) -> str:
    """The `kid` a version 2 header names, read before the MAC is checked (to pick the key)."""
    if not 0 < head_len <= min(_MAX_HEADER, len(body) - _HEAD.size):
        raise BadRequest("state", "resume token is malformed: bad header length")
    try:  # anyone can send any JSON here: a deeply nested one raises RecursionError
        kid = json.loads(body[_HEAD.size : _HEAD.size + head_len])["kid"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BadRequest("state", f"resume token is malformed: {exc}") from exc
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        # anything else is no key_id(): not echoed (the "different key" message names it)
        raise BadRequest("state", "resume token is malformed: kid")
    return kid


def _tensors(payload: bytes, metas: list[dict], specs: list[StateSpec]) -> list[np.ndarray]:
    tensors, offset = [], 0
    for spec, meta in zip(specs, metas, strict=True):
        shape = [1 if d == -1 else d for d in spec.shape]
        if meta["dtype"] != spec.dtype or list(meta["shape"]) != shape:
            raise ValueError(f"tensor {spec.name} does not match the model")
        count = int(np.prod(shape))
        arr = np.frombuffer(payload, dtype=spec.dtype, count=count, offset=offset)
        tensors.append(arr.reshape(shape).copy())
        offset += arr.nbytes
    if offset != len(payload):
        raise ValueError("trailing bytes")
    return tensors


def _progress(raw: dict) -> Progress:
    p = Progress(
        tokens=int(raw["tokens"]),
        max_tokens=int(raw["max_tokens"]),
        seed=int(raw["seed"]),
        uniforms=int(raw["uniforms"]),
        held=str(raw["held"]),
        temperature=float(raw["temperature"]),
        top_k=int(raw["top_k"]),
        top_p=float(raw["top_p"]),
        stop=tuple(str(s) for s in raw["stop"]),
    )
    if not 0 < p.tokens <= p.max_tokens or p.uniforms < 0 or p.seed < 0:
        raise ValueError("stream progress out of range")
    return p
