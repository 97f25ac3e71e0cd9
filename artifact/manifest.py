"""manifest.json: everything needed to use a model.onnx without the trainer.

Layout of a model package::

    models/<name>/<version>/model.onnx
    models/<name>/<version>/manifest.json

Every graph has one shape of interface: an input (`tokens` int64 [batch, time] or `values`
float32 [batch, time, features]) plus the state tensors; outputs (`logits` [batch, time,
vocab] or `prediction` [batch, time, features]) plus the next state tensors. Batch and time
axes are symbolic, so one graph serves prefill (time = prompt length) and decoding (time = 1).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import Vocab

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
TASKS = ("lm", "infill", "forecast")
ARCHITECTURES = ("rnn", "gru", "lstm", "ngram", "hmm", "mlp")
PRECISIONS = ("fp32", "int8", "fp16")  # of the graph's weights; inputs/outputs/state: float32


class ManifestError(ValueError):
    """A manifest that cannot be used; the message says which field and why."""


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor: fed as `input`, read back from `output` after each call.

    `shape` has -1 at `batch_axis`. `init` is the initial value of one batch element (shape
    without the batch axis, nested lists) or a scalar fill value.
    """

    name: str
    input: str
    output: str
    shape: list[int]
    batch_axis: int
    dtype: str = "float32"
    init: Any = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StateSpec:
        try:
            spec = cls(
                name=str(data["name"]),
                input=str(data["input"]),
                output=str(data["output"]),
                shape=[int(d) for d in data["shape"]],
                batch_axis=int(data["batch_axis"]),
                dtype=str(data.get("dtype", "float32")),
                init=_init(data.get("init")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"state entry {data!r} is malformed: {exc}") from exc
        if not 0 <= spec.batch_axis < len(spec.shape) or spec.shape[spec.batch_axis] != -1:
            raise ManifestError(f"state {spec.name!r}: batch_axis must index a -1 in shape")
        if spec.dtype not in ("float32", "int64"):
            raise ManifestError(f"state {spec.name!r}: dtype must be float32 or int64")
        return spec


@dataclass
class Manifest:
    """The parsed manifest.json of one model version."""

    name: str
    version: str
    task: str
    architecture: str
    hyperparameters: dict[str, Any]
    input_name: str
    output_name: str
    state: list[StateSpec]
    tokenizer: TokenizerConfig | None = None
    vocab: list[str] | None = None
    series: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    onnx_sha256: str = ""
    parity: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # manifests written before precisions existed are fp32
    quantization: dict[str, Any] = field(default_factory=dict)  # how int8/fp16 was made
    # log p(first token) [vocab] of lm models that define a start-of-text distribution (n-gram,
    # HMM): the graph only predicts the token after one it was fed, and Infill with an empty
    # left needs this prior to give the model's posterior. None: not defined (RNNs).
    start_log_probs: list[float] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ManifestError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.architecture not in ARCHITECTURES:
            raise ManifestError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        if self.precision not in PRECISIONS:
            raise ManifestError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.task == "forecast":
            if not self.series:
                raise ManifestError("a forecast manifest needs `series` (normalisation, tau)")
        elif not self.vocab or self.tokenizer is None:
            raise ManifestError(f"a {self.task} manifest needs `tokenizer` and `vocab`")
        if self.vocab:  # refused at load, not by every call's TextCodec (INTERNAL)
            try:
                Vocab(self.vocab)
            except ValueError as exc:
                raise ManifestError(f"vocab: {exc}") from exc
        start = self.start_log_probs
        if start is not None and (self.task != "lm" or len(start) != self.vocab_size):
            raise ManifestError(
                f"start_log_probs needs task lm and one value per token ({self.vocab_size}), "
                f"got task {self.task} and {len(start)} values"
            )
        # -inf is a token of probability 0; NaN or +inf (JSON written before manifests were
        # strict) made every empty-left Infill probability NaN
        if start is not None and not all(v < math.inf for v in start):
            raise ManifestError("start_log_probs must be log-probabilities: no NaN or +inf")
        if start is not None and not any(math.isfinite(v) for v in start):
            raise ManifestError("start_log_probs gives every token probability 0")

    # -- derived views -------------------------------------------------------------------
    def build_vocab(self) -> Vocab:
        if not self.vocab:
            raise ManifestError("this model has no vocabulary")
        return Vocab(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab or [])

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "architecture": self.architecture,
            "hyperparameters": self.hyperparameters,
            "inputs": {"name": self.input_name},
            "outputs": {"name": self.output_name},
            "state": [s.to_dict() for s in self.state],
            "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
            "vocab": self.vocab,
            "series": self.series,
            "metrics": self.metrics,
            "training": self.training,
            "onnx_sha256": self.onnx_sha256,
            "parity": self.parity,
            "precision": self.precision,
            "quantization": self.quantization,
            **({"start_log_probs": self.start_log_probs} if self.start_log_probs else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError("manifest must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"unknown manifest format_version {version!r} (this server reads {FORMAT_VERSION})"
            )
        missing = [
            k
            for k in ("name", "version", "task", "architecture", "inputs", "outputs", "state")
            if k not in data
        ]
        if missing:
            raise ManifestError(f"manifest is missing fields: {', '.join(missing)}")
        try:
            tokenizer = data.get("tokenizer")
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                task=str(data["task"]),
                architecture=str(data["architecture"]),
                hyperparameters=dict(data.get("hyperparameters") or {}),
                input_name=str(data["inputs"]["name"]),
                output_name=str(data["outputs"]["name"]),
                state=[StateSpec.from_dict(s) for s in data["state"]],
                tokenizer=None if tokenizer is None else TokenizerConfig.from_dict(tokenizer),
                vocab=list(data["vocab"]) if data.get("vocab") else None,
                series=data.get("series"),
                metrics={  # null: a non-finite number, written so by save
                    k: float(v) for k, v in (data.get("metrics") or {}).items() if v is not None
                },
                training=dict(data.get("training") or {}),
                # null: not set (str(None) was a digest "None" no model.onnx matched)
                onnx_sha256=str(data.get("onnx_sha256") or ""),
                parity=dict(data.get("parity") or {}),
                precision=str(data.get("precision") or "fp32"),
                quantization=dict(data.get("quantization") or {}),
                start_log_probs=_log_probs(data.get("start_log_probs")),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"manifest is malformed: {exc}") from exc

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        # strict JSON: Python writes inf and NaN as Infinity and NaN, which other languages'
        # parsers refuse (a precision check's overflowing perplexity, a metric that diverged)
        text = json.dumps(_finite(self.to_dict()), indent=2, sort_keys=False, allow_nan=False)
        path.write_text(text + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ManifestError(f"{path} does not exist") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def is_version_name(name: str) -> bool:
    """A version folder (OUT/NAME/VERSION) is a positive integer in ASCII digits ("²".isdigit()
    is true too): the server loads only these, and the trainer writes only these. Judged
    without int(): a version of 5,000 digits would raise ValueError
    (sys.get_int_max_str_digits) where "not a version" is meant."""
    return name.isascii() and name.isdigit() and name.strip("0") != ""


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _log_probs(value: Any) -> list[float] | None:
    """An optional JSON list of log-probabilities as floats, null entries as -inf: save writes
    a token of probability 0 (log -inf) as null (TypeError/ValueError: malformed)."""
    return None if value is None else [-math.inf if v is None else float(v) for v in value]


def _init(value: Any) -> Any:
    """A state's `init`: null is the default 0.0, as a left-out key is (np.asarray(None,
    float32) is NaN: every output of the model was NaN while it showed SERVING); a NaN,
    an infinity, or anything but numbers in nested lists, is refused (ValueError)."""
    if value is None:
        return 0.0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        elif not isinstance(item, (int, float)):
            raise ValueError(f"init must be a number or nested lists of numbers, got {item!r}")
        elif not math.isfinite(item):
            raise ValueError(f"init must be finite, got {item}")
    return value
