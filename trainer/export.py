"""Exports any `ExportableModel` to a checked model package, atomically (trainer/staging.py).

Why check before publishing: the server trusts a package; export_check proves the graph
computes what the torch model computes before the package is renamed into place.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rnnserve.artifact.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    Manifest,
    ManifestError,
    sha256_file,
)
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import Vocab
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.export_check import check_parity
from rnnserve.trainer.exportable import onnx_module_of
from rnnserve.trainer.precision import reduce_precision
from rnnserve.trainer.staging import package_dir, staged

CHECKPOINT_FILE = "checkpoint.pt"
OPSET = 17


def _dynamic_axes(model: Any) -> dict[str, dict[int, str]]:
    axes = {model.input_name: {0: "batch", 1: "time"}, model.output_name: {0: "batch", 1: "time"}}
    for spec in model.state_specs():
        axes[spec.input] = {spec.batch_axis: "batch"}
        axes[spec.output] = {spec.batch_axis: "batch"}
    return axes


def write_onnx(model: Any, path: Path, vocab_size: int | None) -> None:
    """Legacy (TorchScript) exporter: dynamo=False keeps the time axis symbolic."""
    specs = model.state_specs()
    if model.input_name == "tokens":
        x = torch.zeros(2, 3, dtype=torch.long)  # [batch, time]
        if vocab_size:
            x = torch.arange(6).reshape(2, 3) % vocab_size
    else:
        x = torch.zeros(2, 3, 1)  # [batch, time, 1]
    state = tuple(model.initial_state(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            onnx_module_of(model),
            (x, *state),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[model.input_name, *(s.input for s in specs)],
            output_names=[model.output_name, *(s.output for s in specs)],
            dynamic_axes=_dynamic_axes(model),
        )


def _start_log_probs(model: Any) -> list[float] | None:
    """The first token's log-probabilities of models that define them (n-gram, HMM)."""
    start = getattr(model, "start_log_probs", None)
    return start() if callable(start) else None


def export_model(
    model: Any,
    out_dir: Path,
    *,
    name: str,
    version: str = "1",
    vocab: Vocab | None,
    tokenizer: TokenizerConfig | None,
    series: dict | None = None,
    metrics: dict[str, float] | None = None,
    training: dict | None = None,
    checkpoint: dict | None = None,
    probe: Sequence[int] | Sequence[float] | None = None,
    probe_source: str = "given text",
    precision: str = "fp32",
    per_channel: bool = True,
    allow_quality_loss: bool = False,
) -> Path:
    """Writes out_dir/<name>/<version>/{model.onnx, manifest.json}; returns that directory.

    `checkpoint` (optional, a plain dict of tensors and primitives) is saved beside them as
    checkpoint.pt, so `rnn-trainer sample --model <that dir>` can rebuild the torch model.
    `probe` (token ids, or normalised values for a forecaster) is what the export check
    feeds: text of the kind the model serves, e.g. the validation split (trainer/probe.py).
    `precision` int8|fp16: the checked fp32 graph is converted and checked against itself,
    perplexity included (trainer/precision.py); `allow_quality_loss` publishes it anyway.
    Raises TrainerError with a one-line message on any failure; nothing is left behind.
    """
    target = package_dir(out_dir, name, version)
    model.eval()
    vocab_size = len(vocab) if vocab is not None else model.hyperparameters().get("vocab_size")
    try:
        with staged(target) as tmp:
            onnx_path = tmp / ONNX_FILE
            try:
                write_onnx(model, onnx_path, vocab_size)
            except TrainerError:
                raise
            except Exception as exc:  # the exporter raises many types; report one line
                text = str(exc).strip()
                first = text.splitlines()[0] if text else type(exc).__name__
                raise TrainerError(f"ONNX export of {name!r} failed: {first}") from exc
            parity = check_parity(onnx_path, model, vocab_size, probe, probe_source)
            manifest = Manifest(
                name=name,
                version=version,
                task=model.task,
                architecture=model.arch,
                hyperparameters=dict(model.hyperparameters()),
                input_name=model.input_name,
                output_name=model.output_name,
                state=list(model.state_specs()),
                tokenizer=tokenizer,
                vocab=vocab.to_list() if vocab is not None else None,
                series=series,
                metrics=dict(metrics or {}),
                training=dict(training or {}),
                onnx_sha256=sha256_file(onnx_path),
                parity=parity,
                start_log_probs=_start_log_probs(model),
            )
            if precision != "fp32":
                quantization, parity["precision"] = reduce_precision(
                    onnx_path, manifest, probe, probe_source, precision=precision,
                    per_channel=per_channel, allow_quality_loss=allow_quality_loss,
                )  # fmt: skip
                manifest = dataclasses.replace(
                    manifest, precision=precision, quantization=quantization, parity=parity,
                    onnx_sha256=sha256_file(onnx_path),
                )  # fmt: skip
            manifest.save(tmp)
            Manifest.load(tmp)  # what the server will do: fail here, not there
            if checkpoint is not None:
                try:
                    torch.save(checkpoint, tmp / CHECKPOINT_FILE)
                except RuntimeError as exc:  # torch's zip writer: a full disk, a size limit
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                    raise TrainerError(
                        f"cannot write the package {target} (disk full? {first})"
                    ) from exc
    except ManifestError as exc:
        raise TrainerError(f"manifest for {name!r} is invalid: {exc}") from exc
    except OSError as exc:  # writing the manifest or moving the package in: full disk, EACCES
        raise TrainerError(f"cannot write the package {target}: {exc.strerror or exc}") from exc
    return target


def is_package(directory: Path) -> bool:
    return (Path(directory) / MANIFEST_FILE).is_file() and (Path(directory) / ONNX_FILE).is_file()
