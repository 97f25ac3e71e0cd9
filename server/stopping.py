"""Stop rules: max_tokens, end-of-sequence, and stop strings that may span token boundaries.

Pure. Text that might be the start of a stop string is held back until the next token
decides, so a client never sees part of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rnnserve.server.errors import BadRequest

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64

LENGTH, STOP, EOS = "length", "stop", "eos"


def validate_stop(stop: list[str]) -> list[str]:
    if len(stop) > MAX_STOP_STRINGS:
        raise BadRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise BadRequest(f"stop[{i}]", f"must be 1..{MAX_STOP_CHARS} characters")
    return list(stop)


@dataclass
class StopChecker:
    """Feeds generated token texts; says what text may be emitted and when to finish."""

    max_tokens: int
    stop: list[str] = field(default_factory=list)
    eos_id: int | None = None
    count: int = 0
    _held: str = ""

    def feed(self, token_id: int, text: str) -> tuple[str, str | None]:
        """-> (text safe to emit now, finish reason or None)."""
        self.count += 1
        if self.eos_id is not None and token_id == self.eos_id:
            return self.flush(), EOS
        pending = self._held + text
        if self.stop:
            cut = _first_stop(pending, self.stop)
            if cut is not None:
                self._held = ""
                return pending[:cut], STOP
        if self.count >= self.max_tokens:
            self._held = ""
            return pending, LENGTH
        keep = _held_suffix(pending, self.stop)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], None

    def feed_run(self, token_ids: list[int], texts: list[str]) -> tuple[int, str, str | None]:
        """Feeds consecutive tokens at once -> (how many were consumed, text safe to emit,
        finish reason or None); the same as `feed` token by token, which it falls back to
        when there are stop strings."""
        if self.stop:
            out, reason, n = [], None, 0
            for token_id, text in zip(token_ids, texts, strict=True):
                n += 1
                safe, reason = self.feed(token_id, text)
                out.append(safe)
                if reason is not None:
                    break
            return n, "".join(out), reason
        n = min(len(token_ids), self.max_tokens - self.count)
        if self.eos_id is not None and self.eos_id in token_ids[:n]:
            n = token_ids.index(self.eos_id) + 1
            self.count += n
            return n, "".join(texts[: n - 1]), EOS
        self.count += n
        return n, "".join(texts[:n]), LENGTH if self.count >= self.max_tokens else None

    def flush(self) -> str:
        """Held-back text, released when the stream ends for another reason."""
        out, self._held = self._held, ""
        return out


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
