"""Text -> tokens -> vocabulary -> ids, plus one-hot encoding and the train/validation split.

Why here and not in artifact/: only the trainer reads whole corpora; the tokenizer and the
vocabulary it uses are the shared ones, so the server splits prompts identically.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from rnnserve.artifact.tokenizer import Tokenizer, TokenizerConfig
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.trainer.errors import TrainerError

if TYPE_CHECKING:  # torch is imported where used: `rnn-trainer --help` (whose parser reads
    import torch  # stats, and so this module) spent 1.4 of its 2.2 s importing it

DEFAULT_CORPUS = "timemachine.txt"
MIN_TOKENS = 16


def default_corpus_text() -> str:
    """The Time Machine (H. G. Wells), shipped as package data so no download is needed."""
    try:
        data = resources.files("rnnserve.trainer").joinpath("data", DEFAULT_CORPUS)
        return data.read_text(encoding="utf-8")
    except (NotADirectoryError, FileNotFoundError, TypeError):
        # a stale editable install can make `trainer` a namespace package: read beside us
        return (Path(__file__).parent / "data" / DEFAULT_CORPUS).read_text(encoding="utf-8")


def read_corpus(path: Path | str | None) -> str:
    """Reads a UTF-8 text file (None: the built-in corpus); bad input raises TrainerError."""
    if path is None:
        return default_corpus_text()
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise TrainerError(f"corpus {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise TrainerError(f"corpus {path} is a directory, not a text file") from exc
    except OSError as exc:
        raise TrainerError(f"cannot read corpus {path}: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrainerError(
            f"corpus {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from exc
    text = text.removeprefix("\ufeff")  # a byte-order mark (Windows editors) is not text
    if not text.strip():
        raise TrainerError(f"corpus {path} is empty")
    return text


@dataclass
class Corpus:
    """A tokenized corpus: the token strings, their vocabulary and the id sequence."""

    tokens: list[str]
    vocab: Vocab
    ids: list[int]
    tokenizer: TokenizerConfig


def build_corpus(
    text: str,
    tokenizer: TokenizerConfig | None = None,
    min_freq: int = 1,
    stop_words: Iterable[str] = (),
    max_tokens: int | None = None,
) -> Corpus:
    """Tokenizes `text`, builds the vocabulary, and encodes; stop words are dropped (word level)."""
    config = tokenizer or TokenizerConfig()
    tokens = Tokenizer(config).tokenize(text)
    stop = set(stop_words)
    if stop:
        if config.level != "word":
            raise TrainerError("stop words apply to word-level tokens only (use --level word)")
        tokens = [t for t in tokens if t not in stop]
    whole = len(tokens)
    if max_tokens is not None:
        if max_tokens < 1:  # tokens[:-5] would silently drop the last 5 instead
            raise TrainerError(f"--max-tokens must be >= 1, got {max_tokens}")
        tokens = tokens[:max_tokens]
    if len(tokens) < MIN_TOKENS:
        if whole >= MIN_TOKENS:  # the text is long enough: the cut made it short
            raise TrainerError(
                f"--max-tokens {max_tokens} keeps {len(tokens)} of the corpus's {whole} "
                f"tokens; at least {MIN_TOKENS} are needed"
            )
        raise TrainerError(
            f"corpus has {len(tokens)} tokens after tokenization; at least {MIN_TOKENS} "
            f"are needed{_letters_only_hint(text, config)}"
        )
    vocab = Vocab.build(tokens, min_freq=min_freq)
    if len(vocab) == len(RESERVED):  # every token would be <unk>: a model that learns nothing
        raise TrainerError(
            f"no token occurs --min-freq {min_freq} times, so every token would be <unk>; "
            "lower --min-freq"
        )
    return Corpus(tokens=tokens, vocab=vocab, ids=vocab.encode(tokens), tokenizer=config)


def _letters_only_hint(text: str, config: TokenizerConfig) -> str:
    """Why letters-only left too few tokens, said only when --keep-punctuation would leave
    enough: a Cyrillic or CJK text collapses to a space or two, but a text that is merely
    short stays too short either way, and pointing at the flag would mislead."""
    if not config.letters_only:
        return ""
    kept = Tokenizer(replace(config, letters_only=False)).tokenize(text, limit=MIN_TOKENS)
    if len(kept) < MIN_TOKENS:
        return ""
    return (
        " (letters-only tokenization maps everything outside a-z, accented and non-Latin "
        "letters too, to spaces; use --keep-punctuation to keep them)"
    )


def one_hot(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[batch, time] int64 -> [batch, time, vocab] float32; an embedding is one_hot @ W."""
    import torch

    return torch.nn.functional.one_hot(ids, vocab_size).float()


def split_ids(ids: list[int], val_fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """Contiguous split: the first (1 - f) for training, the last f for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise TrainerError(f"validation fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(ids) * (1.0 - val_fraction))
    return ids[:cut], ids[cut:]
