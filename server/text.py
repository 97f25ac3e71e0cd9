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
from rnnserve.server.stopping import MAX_STOP_CHARS

# UAX #15's stream-safe limit: no real text has more non-starters in a row
MAX_COMBINING_RUN = 30
# a long text is normalised by prefixes (TextCodec._tokens_up_to): the first one has this
# many characters per token of the limit, and the tokens of a prefix's last BOUNDARY_TOKENS
# may differ from the whole text's (a starter and its marks cut apart: 18 x 31 < 1024)
PREFIX_CHARS_PER_TOKEN = 4
BOUNDARY_TOKENS = 1024


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
        tokens = self._tokens_up_to(text, max_tokens)
        if len(tokens) > max_tokens:
            raise BadRequest(field, f"has more than the limit of {max_tokens} tokens")
        return Encoded(self.vocab.encode(tokens), tokens, self.vocab.count_unknown(tokens))

    def _tokens_up_to(self, text: str, limit: int) -> list[str]:
        """tokenize(text, limit), normalising only as much of a long text as decides the limit.

        NFKC runs over the whole text before tokens can be counted, and it can expand a
        character 18x: 4 MB of U+FDFA held the event loop for about 2 s only to be refused.
        So a long text is tried by prefixes, 4x longer each time. Cutting the text changes
        its normalisation only near the cut (the last starter and its combining marks, at
        most 31 characters after the check above, expanded at most 18x; a run of spaces or
        a word cut in two still counts once), so a prefix with more than `limit` +
        BOUNDARY_TOKENS tokens proves the whole text has more than `limit`. A text under the
        limit is normalised whole in the end, at most 4/3 of the work of one pass."""
        size = PREFIX_CHARS_PER_TOKEN * (limit + 1) + BOUNDARY_TOKENS
        while size < len(text):
            tokens = self.tokenizer.tokenize(text[:size], limit=limit + BOUNDARY_TOKENS)
            if len(tokens) > limit + BOUNDARY_TOKENS:
                return tokens[: limit + 1]
            size *= 4
        return self.tokenizer.tokenize(text, limit=limit)

    def piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def stop_form(self, stop: str, field: str) -> str:
        """`stop` as this model's streamed text would spell it, so that a stop string written
        as text is written matches: that text is normalised (lower case, NFKC, one space per
        run of whitespace) and, at word level, has a space before every token ("isn't." is
        streamed " isn ' t ."), so "Filby." or "isn't" never matched. A leading or trailing
        space stays one (a word boundary); a stop with no token (only whitespace, such as
        "\n", or only what letters_only erases) is kept as sent: made " ", it would stop at
        the first space. BadRequest(field) when normalising makes it over 4x
        MAX_STOP_CHARS (NFKC expands some characters 18x): the checker holds back text as
        long as it."""
        tokens = self.tokenizer.tokenize(stop, limit=4 * MAX_STOP_CHARS)
        if not tokens or not "".join(tokens).strip():
            return stop
        form = self.tokenizer.normalize(stop)
        if self.tokenizer.separator:  # word level: whitespace is not a token
            lead = " " if form.startswith(" ") else ""
            form = lead + self.tokenizer.detokenize(tokens) + (" " if form.endswith(" ") else "")
        if len(form) > 4 * MAX_STOP_CHARS:
            raise BadRequest(field, f"is over {4 * MAX_STOP_CHARS} characters once normalised")
        return form

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
