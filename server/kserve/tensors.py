"""KServe v2 tensors: one plain `Tensor` and its three wire forms (raw bytes, typed protobuf
contents, JSON data). Pure: no Engine, no transport.

Raw data is little-endian, row-major; a BYTES element is a 4-byte little-endian length and
its bytes (the protocol's binary form, used by tritonclient on both transports).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Container, Mapping
from dataclasses import dataclass

import numpy as np

from rnnserve.server.errors import BadRequest

# datatype -> numpy dtype (BYTES: an object array of bytes)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

INTEGER_TYPES = frozenset(d for d in DTYPES if d.startswith(("INT", "UINT")))
FLOAT_TYPES = frozenset(("FP16", "FP32", "FP64"))

# datatype -> InferTensorContents field
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")
MAX_DIM = 2**63 - 1  # the protocol's int64 dims (JSON integers have no bound of their own)

# tensor parameters of Triton extensions this server does not implement -> the extension
UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared-memory",
    "shared_memory_byte_size": "shared-memory",
    "shared_memory_offset": "shared-memory",
    "classification": "classification",
}


@dataclass
class Tensor:
    """A named, typed tensor; `data` is flat (row-major) with `prod(shape)` elements."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # Python ints: a huge shape cannot wrap around to fit


def check_header(name: str, datatype: str, shape: list[int]) -> None:
    """BadRequest unless the datatype is known, the shape has no negative dimension and its
    element count fits an int64. The count is bounded as it is multiplied: math.prod of
    thousands of large dimensions is a number of thousands of digits, quadratic to build and
    too long for str() (sys.get_int_max_str_digits) in the mismatch message."""
    if datatype not in DTYPES:
        raise BadRequest(f"inputs[{name}].datatype", f"unknown datatype {datatype!r}")
    if any(d < 0 or d > MAX_DIM for d in shape):
        raise BadRequest(
            f"inputs[{name}].shape", f"dimensions must be in [0, 2^63 - 1], got {shape}"
        )
    if 0 in shape:
        return
    count = 1
    for d in shape:
        count *= d
        if count > MAX_DIM:
            raise BadRequest(
                f"inputs[{name}].shape",
                f"has more than 2^63 - 1 elements (rank {len(shape)})",
            )


def _checked(name: str, datatype: str, shape: list[int], data: np.ndarray) -> Tensor:
    t = Tensor(name, datatype, list(shape), data)
    if len(data) != t.size:
        raise BadRequest(
            f"inputs[{name}]", f"shape {shape} needs {t.size} elements, got {len(data)}"
        )
    return t


def refuse_unsupported(where: str, parameters: Container[str]) -> None:
    """BadRequest for a tensor parameter of an extension this server lacks. Ignored, it
    would answer something else than asked: outputs inline rather than in the region, raw
    values rather than the top classes; an input in shared memory would be "no data"."""
    for key, extension in UNSUPPORTED_PARAMETERS.items():  # this order, not the map's
        if key in parameters:
            raise BadRequest(
                f"{where}.parameters.{key}",
                f"the {extension} extension is not supported by this server "
                "(its extensions: binary_tensor_data); send and receive the tensor data in "
                "the request and response",
            )


SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def refuse_sequence(parameters: Mapping[str, object]) -> None:
    """BadRequest for Triton's sequence batching (a `sequence_id` other than 0 or "", or a
    start/end flag): each call here is stateless, so a sequence's later calls would run from
    a fresh state while the client believes the server kept it."""
    for key in SEQUENCE_PARAMETERS:
        if parameters.get(key) not in (None, 0, "", False):
            raise BadRequest(
                f"parameters.{key}",
                "sequence batching (state kept by the server between calls) is not "
                "supported: every call is stateless; send the whole sequence in one call, or "
                "use the native Generate with its resume tokens",
            )


def request_timeout(parameters: Mapping[str, object]) -> float | None:
    """Triton's request parameters `timeout` (microseconds; 0 or absent: none) in seconds,
    the call's deadline from its arrival; `priority` is accepted and ignored (calls are not
    queued by priority here). Each must be an unsigned 64-bit integer, as Triton's are (a
    JSON number without a fraction, a gRPC int64_param or uint64_param): anything else is
    BadRequest rather than dropped unsaid (and a 400-digit JSON integer no OverflowError)."""
    for key in ("timeout", "priority"):
        value = parameters.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"parameters.{key}", f"must be an integer, got {value!r}")
        if not 0 <= value < 2**64:
            raise BadRequest(f"parameters.{key}", f"must be in [0, 2^64), got {value}")
    timeout = parameters.get("timeout")
    return timeout / 1e6 if timeout else None


# -- raw bytes ------------------------------------------------------------------------------
def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """Decodes the protocol's binary form (raw_input_contents / binary_data_size)."""
    check_header(name, datatype, shape)
    if datatype != "BYTES":
        dtype = DTYPES[datatype]
        if len(raw) % dtype.itemsize:
            raise BadRequest(f"inputs[{name}]", f"{len(raw)} raw bytes is not whole {datatype}s")
        return _checked(name, datatype, shape, np.frombuffer(raw, dtype=dtype))
    items, at, size = [], 0, math.prod(shape)
    while at < len(raw):
        if len(items) == size:  # past the shape: said now, not after splitting every element
            raise BadRequest(
                f"inputs[{name}]", f"shape {shape} needs {size} elements, the data holds more"
            )
        if at + 4 > len(raw):
            raise BadRequest(f"inputs[{name}]", "BYTES data ends inside an element's length")
        (n,) = _LENGTH.unpack_from(raw, at)
        at += 4
        if at + n > len(raw):
            raise BadRequest(f"inputs[{name}]", "BYTES element is longer than the data left")
        items.append(raw[at : at + n])
        at += n
    return _checked(name, datatype, shape, np.array(items, dtype=object))


def to_raw(tensor: Tensor) -> bytes:
    """The protocol's binary form of a tensor."""
    if tensor.datatype != "BYTES":
        return np.ascontiguousarray(tensor.data, dtype=DTYPES[tensor.datatype]).tobytes()
    parts = []
    for item in tensor.data:
        b = item if isinstance(item, bytes) else str(item).encode()
        parts += [_LENGTH.pack(len(b)), b]
    return b"".join(parts)


# -- typed protobuf contents ----------------------------------------------------------------
def from_contents(name: str, datatype: str, shape: list[int], contents) -> Tensor:
    """Decodes InferTensorContents (the typed repeated field matching the datatype)."""
    check_header(name, datatype, shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadRequest(f"inputs[{name}]", f"{datatype} must be sent as raw contents")
    other = [f.name for f, _ in contents.ListFields() if f.name != field]
    if other:  # else "needs 2 elements, got 0", with the values in int64_contents
        raise BadRequest(
            f"inputs[{name}].contents", f"{datatype} values go in {field}, not {other[0]}"
        )
    values = list(getattr(contents, field))
    dtype = DTYPES[datatype]
    try:  # int_contents / uint_contents are 32-bit: an INT8 or UINT16 value may not fit
        data = np.array(values, dtype=object) if datatype == "BYTES" else np.array(values, dtype)
    except OverflowError as exc:
        raise BadRequest(f"inputs[{name}].contents", f"{exc} ({datatype})") from None
    return _checked(name, datatype, shape, data)


# -- JSON -----------------------------------------------------------------------------------
def from_json(name: str, datatype: str, shape: list[int], data: object) -> Tensor:
    """Decodes a REST tensor's `data` (flat or nested list; BYTES as strings)."""
    check_header(name, datatype, shape)
    flat = np.asarray(data, dtype=object).reshape(-1)
    try:
        if any(isinstance(v, (list, dict)) for v in flat):  # numpy keeps ragged rows whole
            raise TypeError("data must be values, or lists of them nested in rows of equal length")
        if datatype == "BYTES":
            if not all(isinstance(v, str) for v in flat):
                raise TypeError("BYTES data must be strings")
            values = np.array([v.encode() for v in flat], dtype=object)
        elif datatype == "BOOL":
            if not all(isinstance(v, bool) for v in flat):
                raise TypeError("BOOL data must be true or false")
            values = flat.astype(np.bool_)
        else:
            if any(isinstance(v, (bool, str)) or v is None for v in flat):
                raise TypeError(f"{datatype} data must be numbers")
            if datatype in INTEGER_TYPES and any(
                isinstance(v, float) and not v.is_integer() for v in flat
            ):  # astype() would truncate 2.7 to 2 without a word
                raise TypeError(f"{datatype} data must be integers")
            with np.errstate(over="ignore"):
                values = flat.astype(DTYPES[datatype])
            if datatype in FLOAT_TYPES and not np.isfinite(values).all():
                # 1e39 as an FP32 would become inf without a word (and JSON has no NaN)
                raise ValueError(f"values must be finite and within the range of {datatype}")
    except OverflowError as exc:  # numpy's "Python int too large to convert to C long"
        raise BadRequest(  # names neither the datatype nor which range was passed
            f"inputs[{name}].data", f"values must be within the range of {datatype} ({exc})"
        ) from None
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"inputs[{name}].data", str(exc)) from None
    return _checked(name, datatype, shape, values)


def to_json(tensor: Tensor) -> list:
    """A tensor's flat `data` list for a REST response (BYTES as UTF-8 strings)."""
    if tensor.datatype == "BYTES":
        return [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)
                for b in tensor.data]  # fmt: skip
    return tensor.data.tolist()
