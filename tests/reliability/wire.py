"""Raw protobuf wire encoding, so tests can send strings protobuf itself refuses to serialise.

Why: the Python protobuf runtime rejects invalid UTF-8 (unpaired surrogates) on the client side,
so such strings would never reach the server. Appending a raw length-delimited field to a
serialised message sets a singular string field (last one wins) or adds a repeated element.
"""

from __future__ import annotations


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def raw_string(field: int, text: str) -> bytes:
    """Field `field` (wire type 2) holding `text` encoded as UTF-8 with lone surrogates kept."""
    data = text.encode("utf-8", "surrogatepass")
    return varint(field << 3 | 2) + varint(len(data)) + data


def is_valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
