"""Resume tokens: a stream's final recurrent state, signed so any replica can trust it.

Layout (all integers big-endian):
    b"RS" | version u8 (=1) | header length u32 | header JSON | tensor bytes | HMAC-SHA256 (32)
The header binds the token to the model name and version and describes each state tensor
(name, dtype, shape) plus `last_token`, the sampled token the model has not consumed yet:
resuming feeds it first, so the continuation is exactly what the stream would have produced.
The HMAC covers everything before it, keyed with --state-key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
from dataclasses import dataclass

import numpy as np

from rnnserve.artifact.manifest import StateSpec
from rnnserve.server.errors import BadRequest

MAGIC = b"RS"
TOKEN_VERSION = 1
_MAC_LEN = 32
_HEAD = struct.Struct(">2sBI")


@dataclass
class Resumed:
    """A verified token: state tensors (batch of 1) and the token to feed first."""

    state: list[np.ndarray]
    last_token: int


class StateSigner:
    """Makes and checks resume tokens with one secret key."""

    def __init__(self, key: str | bytes = "") -> None:
        if isinstance(key, str):
            key = key.encode()
        self.key = key or secrets.token_bytes(32)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.key, body, hashlib.sha256).digest()

    def sign(self, model: str, version: str, state: list[np.ndarray], last_token: int) -> bytes:
        tensors = [np.ascontiguousarray(t) for t in state]
        header = {
            "model": model,
            "version": version,
            "last_token": int(last_token),
            "tensors": [{"dtype": str(t.dtype), "shape": list(t.shape)} for t in tensors],
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        body = _HEAD.pack(MAGIC, TOKEN_VERSION, len(head)) + head
        body += b"".join(t.tobytes() for t in tensors)
        return body + self._mac(body)

    def verify(
        self, token: bytes, model: str, version: str, specs: list[StateSpec], vocab_size: int
    ) -> Resumed:
        """Checks signature, version, binding and shapes; BadRequest("state", why) otherwise."""
        if len(token) < _HEAD.size + _MAC_LEN:
            raise BadRequest("state", "resume token is truncated")
        body, mac = token[:-_MAC_LEN], token[-_MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise BadRequest(
                "state",
                "resume token signature is invalid (forged, truncated, "
                "or signed with another --state-key)",
            )
        magic, tv, head_len = _HEAD.unpack_from(body)
        if magic != MAGIC or tv != TOKEN_VERSION:
            raise BadRequest("state", f"unsupported resume token version {tv}")
        try:
            header = json.loads(body[_HEAD.size : _HEAD.size + head_len])
            payload = body[_HEAD.size + head_len :]
            if header["model"] != model or header["version"] != version:
                raise BadRequest(
                    "state",
                    f"resume token belongs to {header['model']}/"
                    f"{header['version']}, not {model}/{version}",
                )
            tensors, offset = [], 0
            for spec, meta in zip(specs, header["tensors"], strict=True):
                shape = [1 if d == -1 else d for d in spec.shape]
                if meta["dtype"] != spec.dtype or list(meta["shape"]) != shape:
                    raise ValueError(f"tensor {spec.name} does not match the model")
                count = int(np.prod(shape))
                arr = np.frombuffer(payload, dtype=spec.dtype, count=count, offset=offset)
                tensors.append(arr.reshape(shape).copy())
                offset += arr.nbytes
            if offset != len(payload):
                raise ValueError("trailing bytes")
            last = int(header["last_token"])
            if not 0 <= last < vocab_size:
                raise ValueError("last_token out of range")
        except BadRequest:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRequest("state", f"resume token is malformed: {exc}") from exc
        return Resumed(tensors, last)
