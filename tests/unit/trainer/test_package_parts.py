"""`rnn-trainer package` parts on small hand-built graphs: the vocabulary file, the interface
inference and its messages, and the edge adapters run in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import TokenizerConfig
from rnnserve.artifact.vocab import RESERVED
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.graph_adapt import MISSING_LOGIT, adapt, map_vocab
from rnnserve.trainer.graph_interface import resolve
from rnnserve.trainer.package import PackageRequest, package_model, read_vocab, tokenizer_spec
from rnnserve.trainer.package_check import check_package_graph
from rnnserve.trainer.package_cli import _probe_ids
from rnnserve.trainer.precision import convert_package
from rnnserve.trainer.probe import LONG_TIME, MAX_LOGITS, MIN_TIME, ROWS

USER_TOKENS = ["the", "<eos>", "cat", "<unk>", "sat"]  # the user's own order


def _lookup_graph(
    time_major: bool,
    extra_int_input: bool = False,
    token_type: int = TensorProto.INT64,
    logits_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """logits[.., v] = table[token, v] (+ 0 * state): a graph whose output names its input."""
    v = len(USER_TOKENS)
    axes = ["time", "batch"] if time_major else ["batch", "time"]
    table = np.arange(v * v, dtype=np.float32).reshape(v, v)
    nodes = [
        helper.make_node("Gather", ["table", "tokens"], ["scores"]),
        helper.make_node("Cast", ["scores"], ["logits"], to=logits_type),
        helper.make_node("Identity", ["h"], ["h_next"]),
    ]
    inputs = [
        helper.make_tensor_value_info("tokens", token_type, axes),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "batch", 4]),
    ]
    if extra_int_input:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch", 1]))
    graph = helper.make_graph(
        nodes, "lookup", inputs,
        [helper.make_tensor_value_info("logits", logits_type, [*axes, v]),
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
    with pytest.raises(TrainerError, match=r"several int64 or int32 inputs of rank 2.*--input"):
        resolve(two_int.graph, len(USER_TOKENS))
    with pytest.raises(TrainerError, match="'lengths' is neither the token input nor a state"):
        resolve(two_int.graph, len(USER_TOKENS), input_name="tokens", states=["h:h_next"])
    fixed = _lookup_graph(False)
    fixed.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 2
    fixed.graph.output[1].type.tensor_type.shape.dim[1].dim_value = 2
    with pytest.raises(TrainerError, match=r"batch axis of state h .*no symbolic axis"):
        resolve(fixed.graph, len(USER_TOKENS))


def test_a_state_without_a_symbolic_axis_is_sent_to_re_export_not_to_a_flag() -> None:
    """--state h:h_next:1 cannot make a fixed batch axis symbolic (the axes check refuses it
    next), so the message must not offer that flag; two symbolic axes are what it settles."""
    fixed = _lookup_graph(False)
    for value in [fixed.graph.input[1], fixed.graph.output[1]]:
        value.type.tensor_type.shape.dim[1].dim_value = 2
    with pytest.raises(TrainerError, match="dynamic_axes") as caught:
        resolve(fixed.graph, len(USER_TOKENS))
    assert "--state" not in str(caught.value)
    two = _lookup_graph(False)
    for value in [two.graph.input[1], two.graph.output[1]]:
        value.type.tensor_type.shape.dim[0].dim_param = "layers"
    with pytest.raises(TrainerError, match=r"symbolic axes \[0, 1\]\); name it with --state"):
        resolve(two.graph, len(USER_TOKENS))


def _package_lookup(tmp_path: Path, model: onnx.ModelProto) -> Path:
    (tmp_path / "g.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "vocab.txt").write_text("\n".join(USER_TOKENS) + "\n", encoding="utf-8")
    return package_model(PackageRequest(
        onnx_path=tmp_path / "g.onnx", vocab_path=tmp_path / "vocab.txt",
        tokenizer=TokenizerConfig(level="word"), out=tmp_path / "models", name="m", arch="rnn",
    ))  # fmt: skip


def test_an_int32_token_input_is_fed_the_servers_int64_ids(tmp_path: Path) -> None:
    """tf2onnx and torch with int32 ids export an int32 input; the server sends int64."""
    model = _lookup_graph(True, token_type=TensorProto.INT32)
    iface = resolve(model.graph, len(USER_TOKENS))  # inferred as the token input
    assert iface.input == "tokens" and iface.input_dtype == "int32"
    package = _package_lookup(tmp_path, model)
    manifest = Manifest.load(package)
    assert manifest.training["token_dtype"] == "int32"
    session = ort.InferenceSession(str(package / "model.onnx"))
    x = np.array([[4, 5, 0], [6, 3, 4]], dtype=np.int64)  # packaged ids, as the server sends
    logits, _ = session.run(None, {"tokens": x, "h": np.zeros((1, 2, 4), np.float32)})
    vocab = map_vocab(USER_TOKENS)
    user_table = np.arange(25, dtype=np.float32).reshape(5, 5)
    row = user_table[vocab.to_graph[5]][vocab.to_graph]
    row[vocab.missing] += MISSING_LOGIT
    np.testing.assert_array_equal(logits[0, 1], row)


def test_a_logits_output_the_server_cannot_read_is_named_with_the_reason() -> None:
    """Not "no output scores N tokens": the output does; its dtype or axes are what is wrong."""
    double = _lookup_graph(False, logits_type=TensorProto.DOUBLE)
    with pytest.raises(TrainerError, match=r"logits output logits \(float64 .*must be float32"):
        resolve(double.graph, len(USER_TOKENS))
    flat = _lookup_graph(False)
    del flat.graph.output[0].type.tensor_type.shape.dim[0]  # [batch*time, vocabulary]
    with pytest.raises(TrainerError, match=r"must have 3 axes.*a flattened"):
        resolve(flat.graph, len(USER_TOKENS))
    short = _lookup_graph(False, token_type=TensorProto.INT16)
    with pytest.raises(TrainerError, match="no int64 or int32 input of rank 2"):
        resolve(short.graph, len(USER_TOKENS))


def test_a_state_tensor_in_two_pairs_is_refused() -> None:
    model = _lookup_graph(False)
    with pytest.raises(TrainerError, match="'h' is already in the pair h:h_next"):
        resolve(model.graph, len(USER_TOKENS), states=["h:h_next", "h:h_next"])


def test_a_tokenizer_file_is_read_strictly(tmp_path: Path) -> None:
    """A misspelt key or a string "false" must not fall back to a default silently."""
    spec = tmp_path / "tok.json"
    spec.write_text('{"level": "word", "letters_only": true}', encoding="utf-8")
    assert tokenizer_spec(str(spec)) == TokenizerConfig(level="word", letters_only=True)
    for text, message in [
        ('{"level": "word", "lower_case": false}', "unknown setting 'lower_case'"),
        ('{"level": "word", "lowercase": "false"}', "'lowercase' must be a JSON true or false"),
        ('["word"]', "expected a JSON object"),
        ('{"level": "bpe"}', "tokenizer level must be one of"),
    ]:
        spec.write_text(text, encoding="utf-8")
        with pytest.raises(TrainerError, match=message):
            tokenizer_spec(str(spec))
    spec.write_text('{"level": "word"}', encoding="utf-8")
    with pytest.raises(TrainerError, match="--keep-case and --letters-only go with char or word"):
        tokenizer_spec(str(spec), lowercase=False)


def test_the_precision_probe_reads_text_as_the_fp32_check_does(tmp_path: Path) -> None:
    """A byte-order mark is no token: --precision checks the same ids as the fp32 check."""
    package = _package_lookup(tmp_path, _lookup_graph(False))
    text = tmp_path / "text.txt"
    text.write_text("\ufeffthe cat sat", encoding="utf-8")
    assert _probe_ids(package, str(text)) == [4, 5, 6]


def _renamed_input(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The lookup graph with its token input called `name` (every exporter names its own)."""
    model.graph.input[0].name = name
    model.graph.node[0].input[1] = name
    return model


def test_a_token_input_named_like_an_adapter_tensor_still_packages(tmp_path: Path) -> None:
    """A token input called "ids" once clashed with the renumbering Gather's own output."""
    package = _package_lookup(tmp_path, _renamed_input(_lookup_graph(False), "ids"))
    session = ort.InferenceSession(str(package / "model.onnx"))
    x = np.array([[4, 5, 0]], dtype=np.int64)
    logits, _ = session.run(None, {"ids": x, "h": np.zeros((1, 1, 4), np.float32)})
    vocab = map_vocab(USER_TOKENS)
    row = np.arange(25, dtype=np.float32).reshape(5, 5)[vocab.to_graph[5]][vocab.to_graph]
    row[vocab.missing] += MISSING_LOGIT
    np.testing.assert_array_equal(logits[0, 1], row)


def test_a_packaged_graph_keeps_its_input_name_through_int8(tmp_path: Path) -> None:
    """--precision on `package`: the token input is the user's ("input"), not "tokens"."""
    package = _package_lookup(tmp_path, _renamed_input(_lookup_graph(True), "input"))
    converted = convert_package(package, tmp_path / "models", "m", "2", precision="int8")
    manifest = Manifest.load(converted)
    assert (manifest.input_name, manifest.precision) == ("input", "int8")
    assert manifest.parity["precision"]["perplexity_change"] <= 0.0


def test_a_file_that_is_no_model_is_named_as_such(tmp_path: Path) -> None:
    """An empty file or a bare GraphProto parse as an empty ModelProto: the message must not
    send the user looking for a --input the file does not have."""
    graph_only = _lookup_graph(False).graph.SerializeToString()
    for content in [b"", graph_only]:
        with pytest.raises(TrainerError, match=r"g\.onnx holds no ONNX model"):
            _package_lookup(tmp_path, onnx.ModelProto.FromString(content))
    assert not (tmp_path / "models").exists()


def test_onnx_runtimes_reason_is_not_cut_off_by_its_source_location(tmp_path: Path) -> None:
    """ORT puts a C++ file, line and signature before the reason; 300 characters of them hid
    the reason (here: an IR version newer than it reads)."""
    model = _lookup_graph(False)
    model.ir_version = 99
    with pytest.raises(TrainerError, match="Unsupported model IR version: 99") as caught:
        _package_lookup(tmp_path, model)
    assert "onnxruntime_src" not in str(caught.value)


@pytest.mark.parametrize("version", ["v2", "0", "²", "latest"])
def test_a_version_the_server_would_skip_is_refused(tmp_path: Path, version: str) -> None:
    """The server loads only positive-integer version folders: "v2" would be written, then
    never served."""
    (tmp_path / "g.onnx").write_bytes(_lookup_graph(False).SerializeToString())
    (tmp_path / "vocab.txt").write_text("\n".join(USER_TOKENS) + "\n", encoding="utf-8")
    request = PackageRequest(
        onnx_path=tmp_path / "g.onnx", vocab_path=tmp_path / "vocab.txt",
        tokenizer=TokenizerConfig(level="word"), out=tmp_path / "models", name="m",
        version=version, arch="rnn",
    )  # fmt: skip
    with pytest.raises(TrainerError, match="positive integer"):
        package_model(request)
    assert not (tmp_path / "models").exists()


def test_a_softmax_output_is_refused(tmp_path: Path) -> None:
    """Probabilities fed to the server's log-softmax give a nearly flat distribution: every
    Score and Generate would be wrong, yet every check of the graph against itself passes."""
    model = _lookup_graph(False)
    model.graph.node[1].output[0] = "raw"
    model.graph.node.append(helper.make_node("Softmax", ["raw"], ["logits"], axis=-1))
    with pytest.raises(TrainerError, match=r"'logits' holds probabilities.*log_softmax"):
        _package_lookup(tmp_path, model)
    assert not (tmp_path / "models").exists()


def test_state_names_may_hold_colons(tmp_path: Path) -> None:
    """tf2onnx names tensors "h:0", "Identity:1": --state must still pair them."""
    model = _lookup_graph(False)
    model.graph.input[1].name, model.graph.output[1].name = "h:0", "h_next:0"
    model.graph.node[2].input[0], model.graph.node[2].output[0] = "h:0", "h_next:0"
    for flag, axis in [("h:0:h_next:0", 1), ("h:0:h_next:0:1", 1)]:
        iface = resolve(model.graph, len(USER_TOKENS), states=[flag])
        assert [(s.input, s.output, s.batch_axis) for s in iface.states] == [
            ("h:0", "h_next:0", axis)]  # fmt: skip
    with pytest.raises(TrainerError, match="no state input 'x'"):
        resolve(model.graph, len(USER_TOKENS), states=["x:h_next:0"])


def test_a_version_spelled_with_leading_zeros_is_refused(tmp_path: Path) -> None:
    """A version "01" beside a package "1" is the same version to the server, which keeps
    serving "1" and leaves the new package NOT_SERVING: a re-export meant to replace it never
    would."""
    from rnnserve.trainer.staging import package_dir

    assert package_dir(tmp_path, "m", "10") == tmp_path / "m" / "10"
    with pytest.raises(TrainerError, match="leading zeros \\('1'\\)"):
        package_dir(tmp_path, "m", "01")


def test_an_out_that_is_a_file_is_refused_before_training(tmp_path: Path) -> None:
    """`train --out FILE` trained for minutes and then failed to export (package_dir runs
    before the training, so it now says so at once)."""
    from rnnserve.trainer.staging import package_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainerError, match="is not a directory"):
        package_dir(tmp_path / "file", "m", "1")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "m").write_text("x")
    with pytest.raises(TrainerError, match="is not a directory"):
        package_dir(tmp_path / "out", "m", "1")
    with pytest.raises(TrainerError, match="is not a directory"):  # a file further up
        package_dir(tmp_path / "file" / "models", "m", "1")


def _word_graph(vocab_size: int) -> onnx.ModelProto:
    """logits = table_out[table_in[token]] (+ 0 * state): a bigram model of any vocabulary."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["embed", "tokens"], ["e"]),
        helper.make_node("MatMul", ["e", "proj"], ["logits"]),
        helper.make_node("Identity", ["h"], ["h_next"]),
    ]
    graph = helper.make_graph(
        nodes, "words",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "time", vocab_size]),
         helper.make_tensor_value_info("h_next", TensorProto.FLOAT, [1, "batch", 4])],
        [numpy_helper.from_array(rng.standard_normal((vocab_size, 4)).astype(np.float32), "embed"),
         numpy_helper.from_array(rng.standard_normal((4, vocab_size)).astype(np.float32), "proj")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("text", [False, True])
def test_a_large_vocabulary_is_checked_on_shorter_windows(tmp_path: Path, text: bool) -> None:
    """`export` bounds the check's [4, time, V] logits (trainer/probe.py); `package` read 4
    windows of 200 at any V, a dozen float64 copies: over 8 GB at a word vocabulary of 140k."""
    vocab_size = 12_000
    model = _word_graph(vocab_size)
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    iface = resolve(model.graph, vocab_size)
    ids = np.random.default_rng(1).integers(0, vocab_size, 5_000).tolist() if text else None
    parity = check_package_graph(path, iface, vocab_size, ids, "text.txt")
    time = parity["time_lengths"][1]
    assert MIN_TIME <= time < LONG_TIME and ROWS * time * vocab_size <= MAX_LOGITS
    assert parity["probe"].endswith(f"({ROWS} windows of {time})" if text else f"of {time})")
