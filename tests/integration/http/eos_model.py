"""A model repository whose language model is known exactly, for tests of how a stream ends.

`eos` is a lookup table packaged by `rnn-trainer package` (task lm, char tokenizer): each
token's next token is certain (logit 20 against -20), `a -> b -> c -> d -> e -> <eos>`, and
any other token -> `a`. So greedy and sampled completions alike of "a" are "bcde" and then
the end-of-sequence token: five generated tokens, four of them shown. No training, seconds to
build (the tiny zoo's models never generate <eos>: their corpus has none).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = ["<unk>", "<pad>", "<bos>", "<eos>", "a", "b", "c", "d", "e"]
NEXT = {"a": "b", "b": "c", "c": "d", "d": "e", "e": "<eos>"}
NAME = "eos"


def lookup_table() -> np.ndarray:
    """Logits [token, next token]: 20 for the certain next token, -20 for every other."""
    size = len(VOCAB)
    table = np.full((size, size), -20.0, dtype=np.float32)
    for i, token in enumerate(VOCAB):
        table[i, VOCAB.index(NEXT.get(token, "a"))] = 20.0
    return table


def _graph(path: Path, table: np.ndarray) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    size = len(VOCAB)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "tokens"], ["logits"], axis=0),
            helper.make_node("Identity", ["h0"], ["hn"]),  # a state the server carries
        ],
        "eos",
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", 1]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "time", size]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", 1]),
        ],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def build_repo(out: Path, name: str = NAME, table: np.ndarray | None = None) -> Path:
    """`out` as a model repository holding `name`/1, the model above (or the lookup of
    `table`, logits [token, next token]); returns `out`."""
    from rnnserve.trainer import cli

    work = out.parent / f"{out.name}-src"
    work.mkdir(parents=True, exist_ok=True)
    _graph(work / "model.onnx", lookup_table() if table is None else table)
    (work / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    args = ["package", "--onnx", str(work / "model.onnx"), "--vocab", str(work / "vocab.txt"),
            "--tokenizer", "char", "--arch", "rnn", "--name", name, "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    return out
