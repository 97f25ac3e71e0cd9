"""JSON log lines with the current call's request id and, when traced, its trace id
(contextvars set by the interceptor), so a log line leads to its trace and back."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="")

# an `Authorization: ...` header quoted in a message, up to the quote or line end around it
# (the placeholder of rnnserve's own "send 'authorization: Bearer <token>'" hints is no secret)
_CREDENTIALS = re.compile(r"(?i)(authorization\s*:\s*)(?!\s|bearer <token>')[^'\"\r\n]+")
# a bearer value quoted without its header name: aiohttp's "Got more than 8190 bytes" error
# for an over-long header quotes the start of the value alone (b'Bearer S8S8...'); only at
# the start of a quotation, so prose ("invalid bearer token") stays as it is
_BEARER = re.compile(r"(?i)(['\"]bearer\s+)(?!<token>|<redacted>)[^\s'\"]+")


def scrub(text: str) -> str:
    """`text` with the value of any Authorization header in it replaced by <redacted>.

    Why: aiohttp quotes the header line it cannot parse in its error ("Invalid header value
    char: b'Authorization: Bearer <the token>\\x01'"), which went to the log as it was."""
    return _BEARER.sub(r"\1<redacted>", _CREDENTIALS.sub(r"\1<redacted>", text))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, msg, request_id, trace_id (W3C, 32
    hex digits) and any `extra` fields. `pid` tells apart the lines of --workers processes
    and --decode-process children, which share the server's stderr."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": scrub(record.getMessage()),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        tid = trace_id.get()
        if tid:
            entry["trace_id"] = tid
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure(level: str = "INFO") -> None:
    """Routes every logger to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
