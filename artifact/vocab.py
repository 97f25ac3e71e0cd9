"""Vocabulary: reserved tokens first, then tokens by descending frequency.

Ids are stable for a given corpus: ties in frequency break by the token's text, so two
trainings on the same data produce the same vocabulary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<bos>", "<eos>"
RESERVED = (UNK, PAD, BOS, EOS)
# ids that never come next in text: a model of text gives them no probability (n-gram, HMM)
NOT_TEXT_IDS = tuple(RESERVED.index(t) for t in (PAD, BOS, EOS))


class Vocab:
    """Maps tokens to ids and back; unknown tokens map to `<unk>` (id 0)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if tuple(tokens[: len(RESERVED)]) != RESERVED:
            raise ValueError(f"a vocabulary must start with the reserved tokens {RESERVED}")
        for i, token in enumerate(tokens):  # a JSON 1 or null would fail every text call
            if not isinstance(token, str) or not token:
                raise ValueError(f"vocabulary token {i} must be a non-empty string, got {token!r}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be unique")
        self.idx_to_token: list[str] = list(tokens)
        self.token_to_idx: dict[str, int] = {t: i for i, t in enumerate(self.idx_to_token)}

    @classmethod
    def build(
        cls,
        tokens: Iterable[str],
        min_freq: int = 1,
        stop_words: Iterable[str] = (),
        max_size: int | None = None,
    ) -> Vocab:
        """Counts tokens; keeps those seen at least `min_freq` times and not stop words."""
        counts = Counter(tokens)
        dropped = set(stop_words) | set(RESERVED)
        kept = [(t, c) for t, c in counts.items() if c >= min_freq and t not in dropped]
        kept.sort(key=lambda tc: (-tc[1], tc[0]))
        if max_size is not None:
            kept = kept[: max(0, max_size - len(RESERVED))]
        return cls([*RESERVED, *(t for t, _ in kept)])

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __contains__(self, token: str) -> bool:
        return token in self.token_to_idx

    @property
    def unk(self) -> int:
        return 0

    @property
    def pad(self) -> int:
        return 1

    @property
    def bos(self) -> int:
        return 2

    @property
    def eos(self) -> int:
        return 3

    def encode(self, tokens: Iterable[str]) -> list[int]:
        get = self.token_to_idx.get
        return [get(t, 0) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.idx_to_token[i] for i in ids]

    def count_unknown(self, tokens: Iterable[str]) -> int:
        return sum(1 for t in tokens if t not in self.token_to_idx)

    def to_list(self) -> list[str]:
        return list(self.idx_to_token)
