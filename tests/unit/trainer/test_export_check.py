"""The export check: a correct graph passes whatever the training did; a wrong one is refused,
with a message naming the check that failed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.export import export_model, write_onnx
from rnnserve.trainer.export_check import check_parity
from rnnserve.trainer.forecast.models import LatentForecaster
from rnnserve.trainer.models import RNNLM, BiRNNInfill, ModelConfig
from rnnserve.trainer.ngram import train_ngram
from rnnserve.trainer.probe import LONG_TIME, MAX_LOGITS, MIN_TIME, ROWS

VOCAB = Vocab.build(list("the time machine"))
TEXT = VOCAB.encode(list("the time traveller for so it will be convenient to speak of him " * 8))


def _lstm(chaotic: bool = False) -> RNNLM:
    torch.manual_seed(0)
    model = RNNLM(ModelConfig("lstm", len(VOCAB), 16, 1, 8)).eval()
    if chaotic:  # recurrent weights scaled up: float rounding grows until runs disagree
        with torch.no_grad():
            model.rnn.weight_hh_l0.mul_(8.0)
            model.head.weight.mul_(4.0)
    return model


def _rewrite(path: Path, change: Callable[[onnx.ModelProto], None]) -> Path:
    graph = onnx.load(str(path))
    change(graph)
    onnx.save(graph, str(path))
    return path


def _recurrent_weights(graph: onnx.ModelProto, index: int = 0) -> dict[str, onnx.TensorProto]:
    """W, R, B of the graph's index-th RNN, GRU or LSTM node."""
    node = [n for n in graph.graph.node if n.op_type in ("RNN", "GRU", "LSTM")][index]
    inits = {i.name: i for i in graph.graph.initializer}
    return {"W": inits[node.input[1]], "R": inits[node.input[2]], "B": inits[node.input[3]]}


def _set(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), tensor.name))


def _perturb_one_recurrent_weight(graph: onnx.ModelProto) -> None:
    r = _recurrent_weights(graph)["R"]
    value = numpy_helper.to_array(r).copy()
    value[0, 3, 5] += 0.05
    _set(r, value)


def _swap_forget_and_output_gates(graph: onnx.ModelProto) -> None:
    hidden = 16
    for tensor in _recurrent_weights(graph).values():
        value = numpy_helper.to_array(tensor).copy()
        blocks = [
            value[:, i * hidden : (i + 1) * hidden].copy() for i in range(value.shape[1] // hidden)
        ]
        blocks[1], blocks[2] = blocks[2], blocks[1]  # o <-> f (B holds W's then R's biases)
        _set(tensor, np.concatenate(blocks, axis=1))


def _fix_time_axis(graph: onnx.ModelProto) -> None:
    tokens = next(i for i in graph.graph.input if i.name == "tokens")
    tokens.type.tensor_type.shape.dim[1].dim_value = 3


def test_a_chaotic_model_exports(tmp_path: Path) -> None:
    path = export_model(_lstm(chaotic=True), tmp_path, name="m", vocab=VOCAB,
                        tokenizer=TokenizerConfig(), probe=TEXT)  # fmt: skip
    from rnnserve.artifact.manifest import Manifest

    parity = Manifest.load(path).parity
    assert parity["ok"] is True
    # really chaotic: torch itself (float32 vs float64) drifts by nats over the window ...
    assert parity["max_rounding_drift"] > 0.1
    # ... while one step from a shared state agrees to rounding
    assert parity["max_abs_diff_by_check"]["one step from torch's state"] < 1e-4


@pytest.mark.parametrize("chaotic", [False, True])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _perturb_one_recurrent_weight,
            r"export check failed \(.+\): (.+ are .+ apart|the most likely)",
        ),
        (
            _swap_forget_and_output_gates,
            r"export check failed \(.+\): (.+ are .+ apart|the most likely)",
        ),
        (_fix_time_axis, r"export check failed \(symbolic axes\): axis 1 \(time\) of 'tokens'"),
    ],
)
def test_a_wrong_graph_is_refused(tmp_path: Path, chaotic: bool, change, message: str) -> None:
    model = _lstm(chaotic)
    path = tmp_path / "model.onnx"
    write_onnx(model, path, len(VOCAB))
    check_parity(path, model, len(VOCAB), probe=TEXT)  # the graph as written passes
    _rewrite(path, change)
    with pytest.raises(TrainerError, match=message) as caught:
        check_parity(path, model, len(VOCAB), probe=TEXT)
    print(caught.value)


class _MaskedLSTM(RNNLM):
    """Gives token 0 a logit of -inf (a masked token): its log-prob is -inf in every run."""

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, *rest = super().forward(tokens, *state)
        masked = torch.arange(logits.shape[-1]) == 0
        return (logits.masked_fill(masked, float("-inf")), *rest)


def _shift_head_bias(graph: onnx.ModelProto) -> None:
    bias = next(i for i in graph.graph.initializer if i.name == "head.bias")
    value = numpy_helper.to_array(bias).copy()
    value[5] += 1.0
    _set(bias, value)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # -inf - -inf in numpy
def test_a_masked_token_does_not_make_the_tolerance_infinite(tmp_path: Path) -> None:
    """-inf - -inf is NaN rounding drift, which read as unbounded let any graph pass."""
    torch.manual_seed(0)
    model = _MaskedLSTM(ModelConfig("lstm", len(VOCAB), 16, 1, 8)).eval()
    path = tmp_path / "model.onnx"
    write_onnx(model, path, len(VOCAB))
    assert check_parity(path, model, len(VOCAB), probe=TEXT)["max_abs_diff"] < 1e-4
    _rewrite(path, _shift_head_bias)
    with pytest.raises(TrainerError, match=r"export check failed \(.+\): log-prob.+ apart"):
        check_parity(path, model, len(VOCAB), probe=TEXT)


def test_a_large_vocabulary_is_checked_on_shorter_windows(tmp_path: Path) -> None:
    """4 windows of 200 tokens whatever the vocabulary: the check holds a dozen float64 copies
    of the [4, 200, V] logits, over 8 GB for a word-level model of V = 140k (a 560 KB unigram
    table), so `train` ended in a MemoryError. The windows shrink so 4 x time x V is bounded."""
    vocab = Vocab([*RESERVED, *(f"w{i}" for i in range(12_000))])
    ids = np.random.default_rng(0).integers(len(RESERVED), len(vocab), 5_000).tolist()
    model = train_ngram(ids, len(vocab), n=1)
    out = export_model(model, tmp_path, name="big", vocab=vocab,
                       tokenizer=TokenizerConfig(level="word"), probe=ids)  # fmt: skip
    parity = Manifest.load(out).parity
    time = parity["time_lengths"][1]
    assert MIN_TIME <= time < LONG_TIME and ROWS * time * len(vocab) <= MAX_LOGITS
    assert parity["probe"].endswith(f"({ROWS} windows of {time})")


def _swap_first_two_gates(graph: onnx.ModelProto) -> None:
    """GRU (z, r, h) or LSTM (i, o, f, c): the first two gate blocks trade places."""
    hidden = 16
    for tensor in _recurrent_weights(graph).values():
        value = numpy_helper.to_array(tensor).copy()
        blocks = [value[:, i * hidden : (i + 1) * hidden].copy()
                  for i in range(value.shape[1] // hidden)]  # fmt: skip
        gates = len(blocks) // 2 if tensor.name == _recurrent_weights(graph)["B"].name else 0
        for first in {0, gates}:  # B holds W's then R's biases
            blocks[first], blocks[first + 1] = blocks[first + 1], blocks[first]
        _set(tensor, np.concatenate(blocks, axis=1))


def _chaotic_infill(arch: str) -> BiRNNInfill:
    torch.manual_seed(0)
    model = BiRNNInfill(ModelConfig(arch, len(VOCAB), 16, 1, 8, bidirectional=True)).eval()
    with torch.no_grad():
        model.fwd.weight_hh_l0.mul_(8.0)
        model.bwd.weight_hh_l0.mul_(8.0)
        model.head.weight.mul_(4.0)
    return model


@pytest.mark.parametrize(
    ("arch", "change"),
    [
        ("rnn", _perturb_one_recurrent_weight),
        ("gru", _perturb_one_recurrent_weight),
        ("gru", _swap_first_two_gates),
        ("lstm", _swap_first_two_gates),
    ],
)
def test_a_wrong_chaotic_infill_graph_is_refused(tmp_path: Path, arch: str, change) -> None:
    """An infill graph has no state, so there was no check from torch's state: only the whole
    window, where a chaotic model's own rounding allows whole nats and swapped gates passed."""
    model = _chaotic_infill(arch)
    path = tmp_path / "model.onnx"
    write_onnx(model, path, len(VOCAB))
    parity = check_parity(path, model, len(VOCAB), probe=TEXT)  # the graph as written passes
    assert parity["max_rounding_drift"] > 0.01  # really chaotic over the whole window
    _rewrite(path, change)
    with pytest.raises(TrainerError, match=r"export check failed \(.+\): .+ are .+ apart"):
        check_parity(path, model, len(VOCAB), probe=TEXT)


SERIES = np.sin(np.arange(400) / 5.0).astype(np.float32).tolist()
ARCHS = {  # model, probe: every recurrent kind the trainer exports
    "rnn": (lambda: RNNLM(ModelConfig("rnn", len(VOCAB), 16, 1, 8)), TEXT),
    "gru": (lambda: RNNLM(ModelConfig("gru", len(VOCAB), 16, 1, 8)), TEXT),
    "lstm": (lambda: RNNLM(ModelConfig("lstm", len(VOCAB), 16, 1, 8)), TEXT),
    "lstm 2 layers": (lambda: RNNLM(ModelConfig("lstm", len(VOCAB), 16, 2, 8)), TEXT),
    "infill gru": (
        lambda: BiRNNInfill(ModelConfig("gru", len(VOCAB), 16, 1, 8, bidirectional=True)),
        TEXT,
    ),
    "forecast rnn": (lambda: LatentForecaster("rnn", 16, 1), SERIES),
    "forecast lstm": (lambda: LatentForecaster("lstm", 16, 1), SERIES),
}


def _built(arch: str, chaotic: bool) -> tuple[torch.nn.Module, list, int | None]:
    make, probe = ARCHS[arch]
    torch.manual_seed(0)
    model = make().eval()
    if chaotic:  # every recurrent weight x 8, the head x 4
        with torch.no_grad():
            for name, weight in model.named_parameters():
                weight.mul_(8.0 if "weight_hh" in name else 4.0 if name == "head.weight" else 1)
    return model, probe, len(VOCAB) if model.input_name == "tokens" else None


def _wrong_recurrence(graph: onnx.ModelProto) -> None:
    """Two gate blocks swapped (GRU, LSTM), or one recurrent weight moved by 0.5 (RNN)."""
    node = next(n for n in graph.graph.node if n.op_type in ("RNN", "GRU", "LSTM"))
    if node.op_type != "RNN":
        _swap_first_two_gates(graph)
        return
    r = _recurrent_weights(graph)["R"]
    value = numpy_helper.to_array(r).copy()
    value[0, 3, 5] += 0.5
    _set(r, value)


def _fix_input_time_axis(graph: onnx.ModelProto) -> None:
    graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3


@pytest.mark.parametrize("chaotic", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_exports_and_a_wrong_graph_of_it_is_refused(
    tmp_path: Path, arch: str, chaotic: bool
) -> None:
    model, probe, vocab_size = _built(arch, chaotic)
    path = tmp_path / "model.onnx"
    write_onnx(model, path, vocab_size)
    check_parity(path, model, vocab_size, probe=probe)  # the graph as written passes
    written = path.read_bytes()
    _rewrite(path, _wrong_recurrence)
    with pytest.raises(TrainerError, match=r"export check failed \(.+\): .+ are .+ apart"):
        check_parity(path, model, vocab_size, probe=probe)
    path.write_bytes(written)
    _rewrite(path, _fix_input_time_axis)
    with pytest.raises(TrainerError, match=r"export check failed \(symbolic axes\): axis 1"):
        check_parity(path, model, vocab_size, probe=probe)
