"""The fast (torch.nn) recurrent models: a left-to-right LM and a bidirectional infill model.

Both embed tokens (an embedding is one-hot times a matrix, see corpus.one_hot), run
nn.RNN/GRU/LSTM, and project to vocabulary logits. They satisfy `ExportableModel`, so the one
exporter writes both; nn.RNN/GRU/LSTM export as single ONNX ops with a symbolic time axis.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from rnnserve.artifact.manifest import StateSpec
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.exportable import ExportableBase

RNN_ARCHS = ("rnn", "gru", "lstm")
_CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model from its state_dict (stored in checkpoints)."""

    arch: str
    vocab_size: int
    hidden: int = 128
    layers: int = 1
    embed: int = 32
    bidirectional: bool = False
    dropout: float = 0.0  # on embeddings, between layers and before the head (training only)
    weight_drop: float = 0.0  # DropConnect on the recurrent (hidden-to-hidden) weights

    def __post_init__(self) -> None:
        if self.arch not in RNN_ARCHS:
            raise TrainerError(
                f"unknown arch {self.arch!r} for a recurrent model; choose one of "
                f"{', '.join(RNN_ARCHS)}"
            )
        for field_name in ("vocab_size", "hidden", "layers", "embed"):
            if getattr(self, field_name) < 1:
                raise TrainerError(f"{field_name} must be at least 1")
        for field_name in ("dropout", "weight_drop"):
            p = getattr(self, field_name)
            if not 0.0 <= p < 1.0:
                raise TrainerError(f"{field_name} must be in [0, 1), got {p}")


def _stack(config: ModelConfig) -> nn.Module:
    between = config.dropout if config.layers > 1 else 0.0
    return _CELLS[config.arch](
        config.embed, config.hidden, config.layers, batch_first=True, dropout=between
    )


def run_stack(stack: nn.Module, weight_drop: float, x: torch.Tensor, *state) -> tuple:
    """stack(x, *state), with DropConnect on its hidden-to-hidden weights while training.

    Dropout on activations cannot touch the recurrence itself (a mask per step would erase
    the memory), so the AWD-LSTM regularises it by zeroing recurrent *weights*, one mask per
    window. The masked weights go in through functional_call: the parameters stay the
    plain ones, so the state_dict and the ONNX export do not change. Inside
    `one_mask_per_window` (truncated and randomized BPTT call the model once per chunk or
    step) the first call's mask serves every call of the window.
    """
    if not (stack.training and weight_drop > 0.0):
        return stack(x, *state)
    dropped = getattr(stack, _WINDOW_MASK, None)
    if dropped is None:
        dropped = {
            name: nn.functional.dropout(w, weight_drop, training=True)
            for name, w in stack.named_parameters()
            if name.startswith("weight_hh")
        }
        if hasattr(stack, _WINDOW_MASK):
            setattr(stack, _WINDOW_MASK, dropped)
    return functional_call(stack, dropped, (x, *state))


_WINDOW_MASK = "_window_weight_drop"


@contextlib.contextmanager
def one_mask_per_window(model: nn.Module) -> Iterator[None]:
    """DropConnect masks drawn once for all the model's calls inside (one window)."""
    stacks = [m for m in model.modules() if isinstance(m, tuple(_CELLS.values()))]
    for stack in stacks:
        setattr(stack, _WINDOW_MASK, None)
    try:
        yield
    finally:
        for stack in stacks:
            delattr(stack, _WINDOW_MASK)


class RNNLM(ExportableBase):
    """Task lm: logits[t] scores token t+1 given tokens <= t and the incoming state."""

    task = "lm"
    input_name = "tokens"
    output_name = "logits"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.arch = config.arch
        self.embedding = nn.Embedding(config.vocab_size, config.embed)
        self.drop = nn.Dropout(config.dropout)
        self.rnn = _stack(config)
        self.head = nn.Linear(config.hidden, config.vocab_size)

    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self.config)

    def state_specs(self) -> list[StateSpec]:
        names = ("h", "c") if self.arch == "lstm" else ("h",)
        shape = [self.config.layers, -1, self.config.hidden]
        return [StateSpec(n, f"{n}_in", f"{n}_out", shape, batch_axis=1) for n in names]

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        device = self.head.weight.device
        h = torch.zeros(self.config.layers, batch_size, self.config.hidden, device=device)
        return (h, h.clone()) if self.arch == "lstm" else (h,)

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.drop(self.embedding(tokens))  # [batch, time, embed]
        drop = self.config.weight_drop
        if self.arch == "lstm":
            out, (h, c) = run_stack(self.rnn, drop, x, (state[0], state[1]))  # out: [b, t, hidden]
            return self.head(self.drop(out)), h, c  # logits: [batch, time, vocab]
        out, h = run_stack(self.rnn, drop, x, state[0])
        return self.head(self.drop(out)), h


class BiRNNInfill(ExportableBase):
    """Task infill: logits[t] scores token t from tokens < t (forward) and > t (backward).

    Two separate unidirectional stacks, not nn.LSTM(bidirectional=True): in a deep
    bidirectional stack layer 2's forward pass reads layer 1's backward output at t, which
    has seen token t itself, so the model could copy its answer. The input at t is ignored.
    """

    task = "infill"
    input_name = "tokens"
    output_name = "logits"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.arch = config.arch
        self.embedding = nn.Embedding(config.vocab_size, config.embed)
        self.drop = nn.Dropout(config.dropout)
        self.fwd = _stack(config)
        self.bwd = _stack(config)
        self.head = nn.Linear(2 * config.hidden, config.vocab_size)

    def hyperparameters(self) -> dict[str, Any]:
        return asdict(self.config)

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.drop(self.embedding(tokens))  # [batch, time, embed]
        drop = self.config.weight_drop
        f, _ = run_stack(self.fwd, drop, x)  # f[t]: summary of tokens <= t, [batch, time, hidden]
        b, _ = run_stack(self.bwd, drop, torch.flip(x, dims=[1]))
        b = torch.flip(b, dims=[1])  # b[t]: summary of tokens >= t
        zero = torch.zeros_like(f[:, :1])  # [batch, 1, hidden]
        left = torch.cat([zero, f[:, :-1]], dim=1)  # tokens < t
        right = torch.cat([b[:, 1:], zero], dim=1)  # tokens > t
        both = self.drop(torch.cat([left, right], dim=-1))  # [batch, time, 2 * hidden]
        return (self.head(both),)  # [batch, time, vocab]


def build_model(config: ModelConfig) -> RNNLM | BiRNNInfill:
    return BiRNNInfill(config) if config.bidirectional else RNNLM(config)
