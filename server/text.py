"""Text <-> token ids for one model, from its manifest's tokenizer settings and vocabulary."""

from __future__ import annotations

import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import cache

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import Tokenizer
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.server.errors import BadRequest

# UAX #15's stream-safe limit: no real text has more non-starters in a row
MAX_COMBINING_RUN = 30


@dataclass
class Encoded:
    """A tokenized text: ids, the token strings, and how many were not in the vocabulary."""

    ids: list[int]
    tokens: list[str]
    unknown: int


class TextCodec:
    """The manifest's tokenizer and vocabulary; `piece(id)` is the streamed text of one token.

    A reserved token (`<unk>`, `<pad>`, `<bos>`, `<eos>`) a model happens to generate streams
    as no text, as `skip_special_tokens` does in TGI and vLLM: its id still comes in
    `token_ids`, but "<pad>" never lands in the user's text."""

    def __init__(self, manifest: Manifest) -> None:
        self.tokenizer = Tokenizer(manifest.tokenizer)
        self.vocab: Vocab = manifest.build_vocab()
        sep = self.tokenizer.separator
        self._pieces = ["" if t in RESERVED else sep + t for t in self.vocab.idx_to_token]

    def encode(self, text: str, field: str, max_tokens: int) -> Encoded:
        """Tokenizes; BadRequest(field) when the text has more than max_tokens tokens (counted
        only up to max_tokens + 1: a huge text is refused without building all its tokens), or
        a run of combining marks NFKC would take quadratic time over."""
        if not text.isascii() and _combining_run().search(text):
            raise BadRequest(
                field,
                f"has more than {MAX_COMBINING_RUN} combining marks in a row (Unicode's "
                "stream-safe limit, UAX #15)",
            )
        tokens = self.tokenizer.tokenize(text, limit=max_tokens)
        if len(tokens) > max_tokens:
            raise BadRequest(field, f"has more than the limit of {max_tokens} tokens")
        return Encoded(self.vocab.encode(tokens), tokens, self.vocab.count_unknown(tokens))

    def piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def __len__(self) -> int:
        return len(self.vocab)


@cache
def _combining_run() -> re.Pattern[str]:
    """Matches more than MAX_COMBINING_RUN characters in a row that NFKC decomposes to a
    non-starter. CPython's NFKC orders such a run with an insertion sort, quadratic in its
    length: 160 kB of marks of two alternating classes held the event loop for seconds.
    Built on first use (a scan of every code point, a tenth of a second) from this
    Python's Unicode tables, so it knows exactly the marks NFKC will reorder."""
    marks = [
        cp
        for cp in range(sys.maxunicode + 1)
        if unicodedata.combining(chr(cp))
        or (
            unicodedata.decomposition(chr(cp))
            and unicodedata.combining(unicodedata.normalize("NFKD", chr(cp))[0])
        )
    ]
    ranges, start = [], marks[0]
    for prev, cp in zip(marks, [*marks[1:], -1], strict=True):
        if cp != prev + 1:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
            start = cp
    return re.compile(f"[{''.join(ranges)}]{{{MAX_COMBINING_RUN + 1},}}")
