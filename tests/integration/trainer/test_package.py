"""Bring your own model: a word-level LSTM written and exported the way pytorch/examples'
word_language_model does it (its own module, names, time-major layout and vocabulary order),
packaged by `rnn-trainer package`, then served by a real in-process server."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import Tokenizer, TokenizerConfig
from rnnserve.trainer import cli
from rnnserve.trainer.corpus import default_corpus_text
from rnnserve.trainer.graph_check import log_probs
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings

WORDS = TokenizerConfig(level="word", letters_only=True)
PROMPT = "the time traveller"


class Dictionary:
    """word <-> id in order of first appearance, as the user's own code numbers them."""

    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            self.idx2word.append(word)
            self.word2idx[word] = len(self.idx2word) - 1
        return self.word2idx[word]


class RNNModel(nn.Module):
    """Container module with an encoder, a recurrent module, and a decoder; time-major."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.2):
        super().__init__()
        self.ntoken, self.nhid, self.nlayers = ntoken, nhid, nlayers
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)

    def forward(self, input, hidden):  # input: [seq_len, batch]
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output))  # [seq_len, batch, ntoken]
        return F.log_softmax(decoded, dim=-1), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid))  # fmt: skip


def _corpus() -> tuple[Dictionary, torch.Tensor]:
    words = Dictionary()
    ids = []
    tokenizer = Tokenizer(WORDS)
    for line in default_corpus_text().splitlines()[:400]:
        if not line.strip():
            continue
        for word in [*tokenizer.tokenize(line), "<eos>"]:
            ids.append(words.add_word(word))
    return words, torch.tensor(ids)


def _train(words: Dictionary, ids: torch.Tensor) -> RNNModel:
    """A few steps of the user's own training loop (what is checked does not depend on how
    well it is trained: the served numbers must equal this torch model's)."""
    torch.manual_seed(0)
    model = RNNModel(len(words.idx2word), 16, 32, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    bptt, batch = 20, 16
    rows = ids[: (len(ids) // batch) * batch].view(batch, -1).t()  # [time, batch]
    model.train()
    for step in range(5):
        i = step * bptt
        x, y = rows[i : i + bptt], rows[i + 1 : i + 1 + bptt]
        out, _ = model(x, model.init_hidden(batch))
        loss = F.nll_loss(out.reshape(-1, model.ntoken), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _export(model: nn.Module, path: Path, axes: dict | None = None, outputs=None) -> Path:
    hidden = model.init_hidden(2)
    x = torch.zeros(5, 2, dtype=torch.long)
    dynamic = {
        "input": {0: "seq", 1: "batch"},
        "output": {0: "seq", 1: "batch"},
        "h0": {1: "batch"},
        "c0": {1: "batch"},
        "hn": {1: "batch"},
        "cn": {1: "batch"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x, hidden), str(path), dynamo=False, opset_version=17,
            input_names=["input", "h0", "c0"], output_names=outputs or ["output", "hn", "cn"],
            dynamic_axes=axes if axes is not None else dynamic,
        )  # fmt: skip
    return path


def _package(tmp: Path, onnx_path: Path, vocab: Path, *extra: str) -> int:
    return cli.main(["package", "--onnx", str(onnx_path), "--vocab", str(vocab),
                     "--tokenizer", "word", "--letters-only", "--out", str(tmp / "models"),
                     "--name", "wordlm", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def user_model(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("byo")
    words, ids = _corpus()
    model = _train(words, ids)
    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(words.idx2word) + "\n", encoding="utf-8")
    return tmp, model, words, _export(model, tmp / "word_lm.onnx"), vocab


@pytest.fixture(scope="module")
def served(user_model) -> Iterator[tuple[ServerThread, Path]]:
    tmp, _model, _words, onnx_path, vocab = user_model
    assert _package(tmp, onnx_path, vocab) == 0
    srv = ServerThread(make_settings(tmp / "models")).start()
    yield srv, tmp / "models" / "wordlm" / "1"
    srv.stop()


def _torch_log_probs(model: RNNModel, words: Dictionary, tokens: list[str]) -> np.ndarray:
    """[time, ntoken] next-word log-probabilities in the user's own ids."""
    x = torch.tensor([[words.word2idx[w]] for w in tokens])  # [time, batch 1]
    with torch.no_grad():
        out, _ = model(x, model.init_hidden(1))
    return out[:, 0].numpy()


def test_the_interface_is_inferred_and_the_vocabulary_renumbered(served) -> None:
    _srv, package = served
    m = Manifest.load(package)
    assert (m.input_name, m.output_name) == ("input", "output")
    assert [(s.input, s.output, s.batch_axis) for s in m.state] == [
        ("h0", "hn", 1), ("c0", "cn", 1)]  # fmt: skip
    assert m.vocab[:4] == ["<unk>", "<pad>", "<bos>", "<eos>"]
    assert m.training["layout"] == "time-major" and m.training["vocab_renumbered"] is True
    assert m.architecture == "lstm" and m.parity["ok"] is True


def test_served_score_equals_the_users_torch_model(served, user_model) -> None:
    srv, _package = served
    _tmp, model, words, _onnx, _vocab = user_model
    text = "the time traveller for so it will be convenient to speak of him"
    tokens = Tokenizer(WORDS).tokenize(text)
    reply = srv.stub.Score(pb.ScoreRequest(model="wordlm", texts=[text]), timeout=60)
    result = reply.results[0]
    assert result.num_tokens == len(tokens) - 1 and result.unknown_tokens == 0
    assert list(result.tokens) == tokens[1:]
    lp = _torch_log_probs(model, words, tokens)
    want = [lp[t, words.word2idx[tokens[t + 1]]] for t in range(len(tokens) - 1)]
    np.testing.assert_allclose(result.token_logprobs, want, atol=1e-4)


def test_served_greedy_generate_equals_the_users_torch_model(served, user_model) -> None:
    srv, _package = served
    _tmp, model, words, _onnx, _vocab = user_model
    request = pb.GenerateRequest(model="wordlm", prompt=PROMPT, max_tokens=8)
    got = [i for msg in srv.stub.Generate(request, timeout=60) for i in msg.token_ids]
    vocab = Manifest.load(_package).vocab
    tokens, want = Tokenizer(WORDS).tokenize(PROMPT), []
    for _ in range(8):
        nxt = words.idx2word[int(np.argmax(_torch_log_probs(model, words, tokens)[-1]))]
        if nxt == "<eos>":  # the server ends the stream there and does not send it
            break
        want.append(nxt)
        tokens.append(nxt)
    assert len(want) >= 4  # a test that generates something
    assert [vocab[i] for i in got] == want


BATCH_ONLY = {name: {1: "batch"} for name in ("input", "output", "h0", "c0", "hn", "cn")}
MISFITS = {
    "fixed time axis": ({"axes": BATCH_ONLY}, [], "axis 0 (time) of 'input' is fixed to 5"),
    "missing state output": (
        {"outputs": ["output"]}, [],
        "state input h0 (float32 [2, batch, 32]) has no output of the same dtype and shape",
    ),
    "state pairs swapped": (  # fits on paper; feeding c back as h changes what it computes
        {}, ["--state", "h0:cn", "--state", "c0:hn"],
        "export check failed (200 single steps vs one call of 200): log-probabilities are",
    ),
    "wrong output name": ({}, ["--output", "logits"], "there is no output 'logits'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_a_graph_that_does_not_fit_is_refused_with_the_reason(
    user_model, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    _tmp, model, _words, _onnx, vocab = user_model
    export_kw, flags, expected = MISFITS[case]
    if "outputs" in export_kw:  # a graph that drops the next state
        wrapper = _DropsState(model)
        onnx_path = _export(wrapper, tmp_path / "g.onnx", outputs=export_kw["outputs"],
                            axes={"input": {0: "seq", 1: "batch"}, "output": {0: "seq", 1: "batch"},
                                  "h0": {1: "batch"}, "c0": {1: "batch"}})  # fmt: skip
    else:
        onnx_path = _export(model, tmp_path / "g.onnx", axes=export_kw.get("axes"))
    assert _package(tmp_path, onnx_path, vocab, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "models" / "wordlm").exists()


def test_vocabulary_tokens_the_tokenizer_never_makes_are_noted(user_model, tmp_path, capsys):
    """A capitalised word under a lowercasing tokenizer is never produced: packaged, with a
    note naming it (its scores would never be used)."""
    _tmp, _model, words, onnx_path, _vocab = user_model
    vocab = tmp_path / "vocab.txt"
    changed = [*words.idx2word[:-1], "Zebra"]  # the same size: the graph still fits
    vocab.write_text("\n".join(changed) + "\n", encoding="utf-8")
    assert _package(tmp_path, onnx_path, vocab) == 0
    out = capsys.readouterr().out
    assert "1 of" in out and "can never come out of the tokenizer ('Zebra')" in out, out
    assert _package(tmp_path, onnx_path, _vocab, "--version", "2") == 0
    assert "can never come out" not in capsys.readouterr().out


def test_a_vocabulary_of_the_wrong_size_is_refused(user_model, tmp_path, capsys) -> None:
    _tmp, _model, words, onnx_path, _vocab = user_model
    short = tmp_path / "short.txt"
    short.write_text("\n".join(words.idx2word[:-3]) + "\n", encoding="utf-8")
    n = len(words.idx2word)
    assert _package(tmp_path, onnx_path, short) == 2
    err = capsys.readouterr().err
    assert f"no output scores {n - 3} tokens per step, the vocabulary's size" in err, err
    assert _package(tmp_path, onnx_path, short, "--output", "output") == 2
    err = capsys.readouterr().err
    assert f"scores {n} tokens per step but the vocabulary has {n - 3}" in err, err


class _DropsState(nn.Module):
    """The user's model behind a forward that returns the output only (no next state)."""

    def __init__(self, inner: RNNModel) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input, hidden):
        return self.inner(input, hidden)[0]

    def init_hidden(self, bsz: int):
        return self.inner.init_hidden(bsz)


class _Int32GRU(nn.Module):
    """Another user's model: batch-major GRU, int32 token ids, raw logits, no reserved tokens."""

    def __init__(self, ntoken: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Embedding(ntoken, 8)
        self.rnn = nn.GRU(8, 16, 2, batch_first=True)
        self.decoder = nn.Linear(16, ntoken)
        with torch.no_grad():  # untrained weights scaled up: a peaked, prompt-dependent model
            for p in self.parameters():
                p.mul_(3.0)

    def forward(self, tokens, h0):
        out, hn = self.rnn(self.encoder(tokens), h0)
        return self.decoder(out), hn


def test_an_int32_batch_major_graph_serves_what_the_graph_computes(tmp_path: Path) -> None:
    """Served Score and greedy Generate == the user's own graph run in ONNX Runtime."""
    chars = list("abcdefghijklmnopqrstuvwxyz ")
    graph = tmp_path / "gru.onnx"
    axes = {"tokens": {0: "b", 1: "t"}, "logits": {0: "b", 1: "t"}, "h": {1: "b"}, "hn": {1: "b"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Int32GRU(len(chars)).eval(), (torch.zeros(2, 5, dtype=torch.int32),
            torch.zeros(2, 2, 16)), str(graph), dynamo=False, opset_version=17,
            input_names=["tokens", "h"], output_names=["logits", "hn"], dynamic_axes=axes,
        )  # fmt: skip
    vocab = tmp_path / "chars.txt"
    vocab.write_text("\n".join(chars) + "\n", encoding="utf-8")
    assert cli.main(["package", "--onnx", str(graph), "--vocab", str(vocab), "--tokenizer",
                     "char", "--out", str(tmp_path / "models"), "--name", "gru"]) == 0  # fmt: skip
    manifest = Manifest.load(tmp_path / "models" / "gru" / "1")
    assert manifest.training["token_dtype"] == "int32"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])

    def user_log_probs(text: str) -> np.ndarray:
        ids = np.array([[chars.index(c) for c in text]], np.int32)
        logits = session.run(["logits"], {"tokens": ids, "h": np.zeros((2, 1, 16), np.float32)})
        return log_probs(logits[0][0])

    srv = ServerThread(make_settings(tmp_path / "models")).start()
    try:
        text = "the quick brown fox"
        result = srv.stub.Score(pb.ScoreRequest(model="gru", texts=[text]), timeout=60).results[0]
        lp = user_log_probs(text)
        want = [lp[t, chars.index(text[t + 1])] for t in range(len(text) - 1)]
        np.testing.assert_allclose(result.token_logprobs, want, atol=1e-4)
        request = pb.GenerateRequest(model="gru", prompt="the qu", max_tokens=10)
        got = [i for msg in srv.stub.Generate(request, timeout=60) for i in msg.token_ids]
    finally:
        srv.stop()
    prompt, greedy = "the qu", ""
    for _ in range(10):
        greedy += chars[int(np.argmax(user_log_probs(prompt + greedy)[-1]))]
    assert "".join(manifest.vocab[i] for i in got) == greedy
