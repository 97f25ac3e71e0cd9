"""Human-readable tables and JSON for rnn-client's output.

Why: the commands only decide *what* to show; alignment, number formats and JSON encoding
(bytes as base64, dataclasses as objects) are done the same way everywhere.
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text columns, right-aligned numbers, two spaces apart."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    """Four decimals, except where they would hide the value: a series in small units
    (0.00123 and 0.00118 both showed 0.0012, 4e-5 showed 0.0000) keeps four significant
    digits, and a large one its units (1e9 + 20 showed 1e+09). `--json` has every digit."""
    if isinstance(value, float):
        size = abs(value)
        if 0 < size < 1e-2 or size >= 1e15 or not math.isfinite(value):
            return f"{value:.4g}"
        return f"{value:.4f}"
    return str(value)


def shorten(text: str, width: int = 40) -> str:
    """One-line preview of a text for a table cell."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no inf or NaN (json.dumps wrote `Infinity`, which jq and JSON.parse
        # refuse): null, as JavaScript's JSON.stringify writes them. The server sends inf
        # for a perplexity past float range, and a manifest's metrics may hold either.
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """JSON for dataclasses, lists and dicts of them; bytes become base64 strings, inf and
    NaN null."""
    return json.dumps(_jsonable(value), ensure_ascii=False, allow_nan=False)


#: Codec error handler writing what stdout's encoding cannot hold as \uXXXX escapes.
ESCAPE_UNENCODABLE = "rnnserve-json-escape"


def _json_escape(err: UnicodeError) -> tuple[str, int]:
    """Each character as JSON's \\uXXXX (a surrogate pair past U+FFFF): valid inside the
    strings --json prints (the only place JSON holds non-ASCII), and readable in a table."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    escaped = []
    for ch in err.object[err.start : err.end]:
        code = ord(ch)
        if code > 0xFFFF:
            code -= 0x10000
            escaped.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            escaped.append(f"\\u{code:04x}")
    return "".join(escaped), err.end


codecs.register_error(ESCAPE_UNENCODABLE, _json_escape)


def tolerate_any_stdout_encoding() -> None:
    """On a terminal that is not UTF-8 (LANG=en_US.ISO-8859-1, PYTHONIOENCODING=ascii) a
    text or token it cannot show used to end the command with UnicodeEncodeError (exit 64,
    "bad usage"); it is escaped instead."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors=ESCAPE_UNENCODABLE)
