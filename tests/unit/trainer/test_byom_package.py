"""`rnn-trainer package` with graphs as users bring them from their own torch code: tiny
models exported by torch.onnx.export (dynamo=False, opset 17) in a second each, packaged, and
run as the server runs them (ONNX Runtime on packaged ids) against the user's torch model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.graph_check import log_probs
from rnnserve.trainer.graph_interface import resolve
from rnnserve.trainer.package import PackageRequest, package_model, read_vocab

CHARS = ["\n", *" abcdefghijklmnopqrstuvwxyz"]  # a char model's newline: no line can hold it
TEXT = "the quick brown fox"


class UserLM(nn.Module):
    """Batch-first embedding -> GRU/LSTM -> linear, as users write it; `swap`: the LSTM's
    next state is returned as (c, h), so the outputs do not come in the inputs' order."""

    def __init__(self, vocab: int, cell: str = "gru", bidirectional: bool = False,
                 swap: bool = False) -> None:  # fmt: skip
        super().__init__()
        torch.manual_seed(0)
        self.cell, self.swap, self.directions = cell, swap, 2 if bidirectional else 1
        self.emb = nn.Embedding(vocab, 4)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(4, 8, batch_first=True, bidirectional=bidirectional)
        self.dec = nn.Linear(8 * self.directions, vocab)
        with torch.no_grad():  # untrained weights scaled up: a peaked, input-dependent model
            for p in self.parameters():
                p.mul_(3.0)

    def forward(self, tokens, *state):
        out, new = self.rnn(self.emb(tokens), state if self.cell == "lstm" else state[0])
        if self.cell != "lstm":
            return self.dec(out), new
        return (self.dec(out), new[1], new[0]) if self.swap else (self.dec(out), *new)

    def zeros(self, batch: int) -> list[torch.Tensor]:
        h = torch.zeros(self.directions, batch, 8)
        return [h, h.clone()] if self.cell == "lstm" else [h]


def _export(model: UserLM, path: Path, inputs: list[str], outputs: list[str]) -> Path:
    axes = {inputs[0]: {0: "batch", 1: "time"}, outputs[0]: {0: "batch", 1: "time"}}
    axes.update({name: {1: "batch"} for name in [*inputs[1:], *outputs[1:]]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (torch.zeros(2, 5, dtype=torch.long), *model.zeros(2)), str(path),
            dynamo=False, opset_version=17, input_names=inputs, output_names=outputs,
            dynamic_axes=axes,
        )  # fmt: skip
    return path


def _package(tmp_path: Path, graph: Path, vocab: Path, **kw) -> Path:
    return package_model(PackageRequest(
        onnx_path=graph, vocab_path=vocab, tokenizer=TokenizerConfig(level="char"),
        out=tmp_path / "models", name="m", **kw,
    ))  # fmt: skip


def _served_log_probs(package: Path, text: str) -> list[float]:
    """log p(token t+1 | tokens <= t) as the server computes it: packaged ids, zero state."""
    manifest = Manifest.load(package)
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[manifest.vocab.index(c) for c in text]], np.int64)
    feed = {manifest.input_name: ids}
    for s in manifest.state:
        shape = [1 if d == -1 else d for d in s.shape]
        feed[s.input] = np.zeros(shape, np.float32)
    lp = log_probs(session.run([manifest.output_name], feed)[0][0])
    return [float(lp[t, ids[0, t + 1]]) for t in range(len(text) - 1)]


def _torch_log_probs(model: UserLM, tokens: list[str], text: str) -> list[float]:
    ids = [tokens.index(c) for c in text]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]), *model.zeros(1))[0][0], -1)
    return [float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1)]


def test_a_json_vocabulary_is_read_as_a_list_or_an_object(tmp_path: Path) -> None:
    """vocab.json / stoi files: ids by position or by value; a newline token fits in one."""
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(CHARS), encoding="utf-8")
    assert read_vocab(listed) == CHARS
    mapped = tmp_path / "map.json"
    mapped.write_text(json.dumps({t: i for i, t in enumerate(CHARS)}, indent=2), encoding="utf-8")
    assert read_vocab(mapped) == CHARS
    bad = tmp_path / "bad.json"
    for data, message in [
        ({"a": 0, "b": 2}, "no token has id 1"), ({"a": 0, "b": 0}, "'b' and 'a' both have id 0"),
        (["a", "a"], "id 1 repeats 'a'"), (["a", ""], "id 1 must be a non-empty string"),
        ({"a": "0", "b": 1}, "must be an integer"), ("a b", "got a JSON str"),
    ]:  # fmt: skip
        bad.write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(TrainerError, match=message):
            read_vocab(bad)
    bad.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(TrainerError, match="not valid JSON"):
        read_vocab(bad)


def test_a_char_model_with_a_newline_token_packages_from_json(tmp_path: Path) -> None:
    model = UserLM(len(CHARS))
    graph = _export(model, tmp_path / "g.onnx", ["input_ids", "h0"], ["logits", "hn"])
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(CHARS), encoding="utf-8")
    request_notes: list[str] = []
    package = package_model(PackageRequest(
        onnx_path=graph, vocab_path=vocab, tokenizer=TokenizerConfig(level="char"),
        out=tmp_path / "models", name="m", notes=request_notes,
    ))  # fmt: skip
    assert any("'\\n'" in note and "never come out" in note for note in request_notes)
    np.testing.assert_allclose(
        _served_log_probs(package, TEXT), _torch_log_probs(model, CHARS, TEXT), atol=1e-4
    )


def test_state_outputs_in_another_order_pair_by_name(tmp_path: Path) -> None:
    """An LSTM returning (logits, cn, hn): h0 pairs with hn, c0 with cn, not by order."""
    tokens = CHARS[1:]
    model = UserLM(len(tokens), "lstm", swap=True)
    graph = _export(model, tmp_path / "g.onnx", ["input_ids", "h0", "c0"], ["logits", "cn", "hn"])
    vocab = tmp_path / "chars.txt"
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    package = _package(tmp_path, graph, vocab)
    manifest = Manifest.load(package)
    assert [(s.input, s.output) for s in manifest.state] == [("h0", "hn"), ("c0", "cn")]
    np.testing.assert_allclose(
        _served_log_probs(package, TEXT), _torch_log_probs(model, tokens, TEXT), atol=1e-4
    )


def test_state_pairs_guessed_wrong_are_refused_naming_state(tmp_path: Path) -> None:
    """Names that tell nothing (a, b -> y, x) and outputs in the other order: the step check
    refuses the guess, and the message says which pairs were guessed and the flag to set."""
    tokens = CHARS[1:]
    model = UserLM(len(tokens), "lstm", swap=True)
    graph = _export(model, tmp_path / "g.onnx", ["input_ids", "a", "b"], ["logits", "y", "x"])
    vocab = tmp_path / "chars.txt"
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    with pytest.raises(TrainerError, match=r"single steps.*inferred as a->y, b->x.*--state"):
        _package(tmp_path, graph, vocab)
    assert not (tmp_path / "models" / "m").exists()
    _package(tmp_path, graph, vocab, states=["a:x", "b:y"])  # what the message asks for


def test_a_bidirectional_graph_is_refused_with_the_reason(tmp_path: Path) -> None:
    tokens = CHARS[1:]
    graph = _export(UserLM(len(tokens), bidirectional=True), tmp_path / "g.onnx",
                    ["input_ids", "h0"], ["logits", "hn"])  # fmt: skip
    vocab = tmp_path / "chars.txt"
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    with pytest.raises(TrainerError, match=r"runs bidirectional.*left to right"):
        _package(tmp_path, graph, vocab)


def test_a_vocabulary_one_token_short_is_said_so(tmp_path: Path) -> None:
    tokens = CHARS[1:]
    graph = _export(UserLM(len(tokens)), tmp_path / "g.onnx", ["input_ids", "h0"], ["logits", "hn"])
    vocab = tmp_path / "chars.txt"
    vocab.write_text("\n".join(tokens[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(TrainerError, match=r"logits \(float32 \[batch, time, 27\]\) scores 27, 1"
                                           r" more; package the vocabulary"):  # fmt: skip
        _package(tmp_path, graph, vocab)


def _forecaster(time_major: bool) -> onnx.ModelProto:
    """values -> prediction with a state, as a user's GRU forecaster exports (no token ids)."""
    axes = ["time", "batch", 1] if time_major else ["batch", "time"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["values"], ["prediction"]),
         helper.make_node("Identity", ["h0"], ["hn"])],
        "forecaster",
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, axes),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", 8])],
        [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, axes),
         helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", 8])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("time_major", [False, True])
def test_a_forecaster_is_told_package_makes_language_models(
    tmp_path: Path, time_major: bool
) -> None:
    """Not "name it with --input", which only moves the refusal to the input's dtype."""
    (tmp_path / "f.onnx").write_bytes(_forecaster(time_major).SerializeToString())
    vocab = tmp_path / "v.txt"
    vocab.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(TrainerError, match=r"forecaster.*language models.*--task forecast") as e:
        _package(tmp_path, tmp_path / "f.onnx", vocab)
    assert "--input" not in str(e.value)


def test_a_float_state_beside_an_unusable_token_input_is_no_forecaster() -> None:
    """The state is float too, but has one unfixed axis: the doubt is the token input."""
    graph = _forecaster(False).graph
    graph.input[0].type.tensor_type.elem_type = TensorProto.INT16
    with pytest.raises(TrainerError, match="name it with --input") as e:
        resolve(graph, 2)
    assert "forecaster" not in str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("opset", 1000, r"opset 1000 is newer than onnxruntime .* export with opset_version=\d+"),
     ("ir", 99, r"IR version: 99, max supported IR version: (\d+) \(onnxruntime .*\); save the"
                r" graph with an onnx package that writes IR version \1 or lower")],
)  # fmt: skip
def test_a_graph_too_new_for_onnxruntime_names_what_to_export(
    tmp_path: Path, field: str, value: int, expected: str
) -> None:
    """ORT's own message put the supported opset after the 300 characters kept."""
    tokens = CHARS[1:]
    graph = _export(UserLM(len(tokens)), tmp_path / "g.onnx", ["input_ids", "h0"], ["logits", "hn"])
    model = onnx.load(str(graph))
    if field == "opset":
        model.opset_import[0].version = value
    else:
        model.ir_version = value
    onnx.save(model, str(graph))
    vocab = tmp_path / "chars.txt"
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    with pytest.raises(TrainerError, match=expected):
        _package(tmp_path, graph, vocab)


def test_other_spellings_of_unk_and_eos_are_noted(tmp_path: Path) -> None:
    tokens = ["<pad>", "[UNK]", "the", "cat", "</s>"]
    graph = _export(UserLM(len(tokens)), tmp_path / "g.onnx", ["input_ids", "h0"], ["logits", "hn"])
    vocab = tmp_path / "words.txt"
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    notes: list[str] = []
    package_model(PackageRequest(
        onnx_path=graph, vocab_path=vocab, tokenizer=TokenizerConfig(level="word"),
        out=tmp_path / "models", name="m", notes=notes,
    ))  # fmt: skip
    shown = "\n".join(notes)
    assert "no <unk>: a token it lacks is fed as id 0 ('<pad>')" in shown, shown
    assert "rename '[UNK]' to <unk>" in shown and "never stops at '</s>'" in shown, shown
