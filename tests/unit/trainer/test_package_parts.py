"""`rnn-trainer package` parts on small hand-built graphs: the vocabulary file, the interface
inference and its messages, and the edge adapters run in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rnnserve.artifact.vocab import RESERVED
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.graph_adapt import MISSING_LOGIT, adapt, map_vocab
from rnnserve.trainer.graph_interface import resolve
from rnnserve.trainer.package import read_vocab

USER_TOKENS = ["the", "<eos>", "cat", "<unk>", "sat"]  # the user's own order


def _lookup_graph(time_major: bool, extra_int_input: bool = False) -> onnx.ModelProto:
    """logits[.., v] = table[token, v] (+ 0 * state): a graph whose output names its input."""
    v = len(USER_TOKENS)
    axes = ["time", "batch"] if time_major else ["batch", "time"]
    table = np.arange(v * v, dtype=np.float32).reshape(v, v)
    nodes = [
        helper.make_node("Gather", ["table", "tokens"], ["logits"]),
        helper.make_node("Identity", ["h"], ["h_next"]),
    ]
    inputs = [
        helper.make_tensor_value_info("tokens", TensorProto.INT64, axes),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "batch", 4]),
    ]
    if extra_int_input:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch", 1]))
    graph = helper.make_graph(
        nodes, "lookup", inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*axes, v]),
         helper.make_tensor_value_info("h_next", TensorProto.FLOAT, [1, "batch", 4])],
        [numpy_helper.from_array(table, "table")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_read_vocab_one_token_per_line(tmp_path: Path) -> None:
    good = tmp_path / "v.txt"
    good.write_text("a\n \nb\n", encoding="utf-8")  # a line holding one space is the space
    assert read_vocab(good) == ["a", " ", "b"]
    bom = tmp_path / "bom.txt"  # saved by a Windows editor: the mark is no part of token 1
    bom.write_text("\ufeffa\nb\n", encoding="utf-8")
    assert read_vocab(bom) == ["a", "b"]
    for text, message in [("a\n\nb\n", "line 2 is empty"), ("a\nb\na\n", "line 3 repeats 'a'")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(TrainerError, match=message):
            read_vocab(bad)


def test_map_vocab_puts_the_reserved_tokens_first_and_keeps_the_users_order() -> None:
    same = map_vocab([*RESERVED, "x"])
    assert same.to_graph is None and same.tokens == [*RESERVED, "x"]
    m = map_vocab(USER_TOKENS)
    assert m.tokens == [*RESERVED, "the", "cat", "sat"]
    # <unk> and <eos> are the user's; <pad> and <bos> are missing and read as the user's <unk>
    assert m.to_graph == [3, 3, 3, 1, 0, 2, 4]
    assert m.missing == [1, 2]


@pytest.mark.parametrize("time_major", [False, True])
def test_adapted_graph_speaks_the_contract(time_major: bool) -> None:
    model = _lookup_graph(time_major)
    iface = resolve(model.graph, len(USER_TOKENS))
    assert (iface.input, iface.output) == ("tokens", "logits")
    assert [(s.input, s.output, s.batch_axis, s.shape) for s in iface.states] == [
        ("h", "h_next", 1, [1, -1, 4])]  # fmt: skip
    assert iface.time_major is time_major  # inferred from the shared "batch" axis name
    vocab = map_vocab(USER_TOKENS)
    session = ort.InferenceSession(adapt(model, iface, vocab).SerializeToString())
    x = np.array([[4, 5, 0], [6, 3, 4]], dtype=np.int64)  # packaged ids, [batch, time]
    logits, _ = session.run(None, {"tokens": x, "h": np.zeros((1, 2, 4), np.float32)})
    assert logits.shape == (2, 3, len(vocab.tokens))
    user_table = np.arange(25, dtype=np.float32).reshape(5, 5)
    for b in range(2):
        for t in range(3):
            row = user_table[vocab.to_graph[x[b, t]]][vocab.to_graph]
            row[vocab.missing] += MISSING_LOGIT
            np.testing.assert_array_equal(logits[b, t], row)


def test_inference_says_which_flag_settles_a_doubt() -> None:
    two_int = _lookup_graph(False, extra_int_input=True)
    with pytest.raises(TrainerError, match=r"several int64 inputs of rank 2.*--input"):
        resolve(two_int.graph, len(USER_TOKENS))
    with pytest.raises(TrainerError, match="'lengths' is neither the token input nor a state"):
        resolve(two_int.graph, len(USER_TOKENS), input_name="tokens", states=["h:h_next"])
    fixed = _lookup_graph(False)
    fixed.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 2
    fixed.graph.output[1].type.tensor_type.shape.dim[1].dim_value = 2
    with pytest.raises(TrainerError, match=r"batch axis of state h .*no symbolic axis"):
        resolve(fixed.graph, len(USER_TOKENS))
