"""Text <-> token ids for one model, from its manifest's tokenizer settings and vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import Tokenizer
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.server.errors import BadRequest


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
        only up to max_tokens + 1: a huge text is refused without building all its tokens)."""
        tokens = self.tokenizer.tokenize(text, limit=max_tokens)
        if len(tokens) > max_tokens:
            raise BadRequest(field, f"has more than the limit of {max_tokens} tokens")
        return Encoded(self.vocab.encode(tokens), tokens, self.vocab.count_unknown(tokens))

    def piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def __len__(self) -> int:
        return len(self.vocab)
