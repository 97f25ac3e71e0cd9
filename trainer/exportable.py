"""The contract every exported model satisfies (RNNs here, n-gram, HMM and forecasters elsewhere).

Why a Protocol: the exporter and the zoo treat all models alike, and the other engineers' models
need not inherit from anything; subclassing `ExportableBase` only adds the defaults.

Graph interface (docs/contracts.md)::

    forward(x, *state) -> (output, *next_state)
    x:      tokens int64 [batch, time]      or values float32 [batch, time, 1]
    output: logits float32 [batch, time, V] or prediction float32 [batch, time, 1]
    state:  one tensor per `state_specs()` entry, in the same order, batch on `batch_axis`
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from rnnserve.artifact.manifest import StateSpec


@runtime_checkable
class ExportableModel(Protocol):
    """What `trainer.export.export_model` needs from a model."""

    task: str  # "lm" | "infill" | "forecast"
    arch: str  # manifest architecture: rnn gru lstm ngram hmm mlp
    input_name: str  # "tokens" or "values"
    output_name: str  # "logits" or "prediction"

    def hyperparameters(self) -> dict[str, Any]: ...

    def state_specs(self) -> list[StateSpec]: ...

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]: ...

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def eval(self) -> Any: ...


class ExportableBase(torch.nn.Module):
    """Optional base class: token LM defaults and `onnx_module()` returning self."""

    task: str = "lm"
    arch: str = "rnn"
    input_name: str = "tokens"
    output_name: str = "logits"

    def hyperparameters(self) -> dict[str, Any]:
        return {}

    def state_specs(self) -> list[StateSpec]:
        return []

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return ()

    def onnx_module(self) -> torch.nn.Module:
        return self


def onnx_module_of(model: Any) -> torch.nn.Module:
    """What to hand torch.onnx.export: `model.onnx_module()` when defined, else the model."""
    getter = getattr(model, "onnx_module", None)
    return getter() if callable(getter) else model


def state_from_spec(spec: StateSpec, batch_size: int) -> np.ndarray:
    """Builds a fresh state the way the server does: broadcast `spec.init` along the batch axis."""
    dtype = np.int64 if spec.dtype == "int64" else np.float32
    shape = list(spec.shape)
    shape[spec.batch_axis] = batch_size
    init = np.asarray(spec.init, dtype=dtype)
    if init.ndim == 0:
        return np.full(shape, init, dtype=dtype)
    one = np.expand_dims(init, spec.batch_axis)  # batch axis of length 1
    return np.ascontiguousarray(np.broadcast_to(one, shape)).astype(dtype)
