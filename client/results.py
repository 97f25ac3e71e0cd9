"""Typed results the client returns instead of protobuf messages.

Why: plain frozen dataclasses print well, compare by value, serialise with `asdict`, and keep
callers independent of generated code.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenEvent:
    """One Generate message: usually one token; the last one has `finish_reason` set."""

    text: str
    token_id: int  # -1 when the message carries no token
    token_ids: tuple[int, ...]
    logprob: float  # natural log, summed over token_ids
    finish_reason: str | None = None  # "length" | "stop" | "eos" on the last message
    # resume token: the last message's with return_state; a checkpoint's (state_every, which
    # failover asks for) on its message, and on the last when the stream ends at max_tokens
    state: bytes | None = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class ScoreResult:
    """How likely one text is: perplexity = exp(-log_likelihood / num_tokens)."""

    perplexity: float
    log_likelihood: float
    num_tokens: int
    unknown_tokens: int
    token_logprobs: tuple[float, ...] = ()
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class InfillCandidate:
    """One candidate for the blank, with its posterior probability."""

    text: str
    token_id: int
    probability: float


@dataclass(frozen=True)
class ForecastResult:
    """Predicted values in the series' units; fitted[i] predicts history[i + fitted_offset];
    lower/upper: each step's 90% interval (empty when the model has none)."""

    forecast: tuple[float, ...]
    fitted: tuple[float, ...] = ()
    fitted_offset: int = 0
    lower: tuple[float, ...] = ()
    upper: tuple[float, ...] = ()


@dataclass(frozen=True)
class StateTensor:
    name: str
    shape: tuple[int, ...]  # batch axis written as -1
    dtype: str


@dataclass(frozen=True)
class VersionInfo:
    """One loaded version of a model, as GetModel/ListModels describe it."""

    version: str
    task: str
    architecture: str
    status: str
    status_reason: str = ""
    vocab_size: int = 0
    tokenizer: str = ""
    execution_provider: str = ""
    rpcs: tuple[str, ...] = ()
    hyperparameters: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    state: tuple[StateTensor, ...] = ()
    precision: str = ""  # fp32, int8 or fp16


@dataclass(frozen=True)
class ModelInfo:
    name: str
    default_version: str
    versions: tuple[VersionInfo, ...] = ()

    def version(self, version: str = "") -> VersionInfo | None:
        """The named version, or the default one when `version` is empty."""
        wanted = version or self.default_version
        return next((v for v in self.versions if v.version == wanted), None)


@dataclass(frozen=True)
class ReloadResult:
    """What ReloadModels changed, as "name/version" strings (failed ones with a reason)."""

    loaded: tuple[str, ...] = ()
    unloaded: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
