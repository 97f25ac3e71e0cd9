"""Char- and word-level tokenizers with a documented, reproducible normalisation.

The trainer and the server must split text identically, so the settings travel in the
manifest and this module is the only implementation.

Normalisation (applied in this order):
1. Unicode NFKC: compatibility forms fold to their plain form (full-width letters, ligatures,
   no-break spaces, composed vs decomposed accents). Invisible format characters (zero-width
   space and joiner, soft hyphen, a BOM in a prompt) are kept, so they are tokens.
2. `lowercase` (default on): str.lower(), not locale-aware: "ß" stays, "İ" becomes "i" plus
   U+0307 (combining dot above).
3. `letters_only` (default off): every run of characters outside a-z (and A-Z when
   `lowercase` is off, so capitals are kept, not blanked) is replaced by a single space — the
   classic Time Machine preprocessing.
4. Runs of whitespace collapse to one space.

Char level: every character of the normalised text is a token.
Word level: tokens are runs of word characters or single punctuation marks (regex
``\\w+|[^\\w\\s]``); whitespace separates and is dropped, so decode joins with spaces. A
combining mark NFKC cannot compose (Devanagari vowel signs, the dot of a lowercased "İ") is
not a word character, so it is a token of its own.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, fields
from itertools import islice

_WORD_RE = re.compile(r"\w+|[^\w\s]")
_NON_LETTERS_RE = re.compile(r"[^a-zA-Z]+")  # after lower() no A-Z is left to keep
_SPACE_RE = re.compile(r"\s+")

LEVELS = ("char", "word")


@dataclass(frozen=True)
class TokenizerConfig:
    """How text becomes tokens; stored in manifest.json under `tokenizer`."""

    level: str = "char"
    lowercase: bool = True
    letters_only: bool = False

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"tokenizer level must be one of {LEVELS}, got {self.level!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerConfig:
        """Strict: a misspelt key would fall back to a default and split text unlike the
        training did; a key this version does not know is a setting it cannot honour."""
        if not isinstance(data, dict):
            raise ValueError(
                f'tokenizer must be a JSON object like {{"level": "char"}}, got {data!r}'
            )
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"tokenizer has unknown settings {', '.join(map(repr, unknown))} "
                f"(settings: {', '.join(known)})"
            )
        return cls(
            level=str(data.get("level", "char")),
            lowercase=_flag(data, "lowercase", True),
            letters_only=_flag(data, "letters_only", False),
        )


def _flag(data: dict, key: str, default: bool) -> bool:
    """A JSON boolean: bool("false") is True, which would tokenize text other than trained."""
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"tokenizer {key} must be true or false, got {value!r}")
    return value


class Tokenizer:
    """Splits text into string tokens and joins them back."""

    def __init__(self, config: TokenizerConfig | None = None) -> None:
        self.config = config or TokenizerConfig()

    def normalize(self, text: str) -> str:
        text = unicodedata.normalize("NFKC", text)
        if self.config.lowercase:
            text = text.lower()
        if self.config.letters_only:
            text = _NON_LETTERS_RE.sub(" ", text)
        return _SPACE_RE.sub(" ", text)

    def tokenize(self, text: str, limit: int | None = None) -> list[str]:
        """The tokens of `text`; with `limit`, at most limit + 1 of them, so a caller refusing
        long texts never builds millions of token strings (NFKC can expand a character 18x:
        4 MB of U+FDFA would be 25 million char tokens, about 2 GB)."""
        text = self.normalize(text)
        if self.config.level == "char":
            return list(text if limit is None else text[: limit + 1])
        if limit is None:
            return _WORD_RE.findall(text)
        return [m.group() for m in islice(_WORD_RE.finditer(text), limit + 1)]

    def detokenize(self, tokens: list[str]) -> str:
        if self.config.level == "char":
            return "".join(tokens)
        return " ".join(tokens)

    @property
    def separator(self) -> str:
        """What goes between two tokens when text is streamed token by token."""
        return "" if self.config.level == "char" else " "
