"""The decode head picks the same tokens, with the same logprobs, as the numpy sampler.

A one-node "language model" (logits = a row of a table chosen by the input token) lets every
row's logits be set exactly, ties included; ONNX Runtime runs the head on it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rnnserve.server import decode_head
from rnnserve.server.decode_head import RowParams
from rnnserve.server.runtime import log_softmax
from rnnserve.server.sampling import Sampler, SamplingParams, draw_rows, sample_rows

V = 12


def _table_lm(table: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "tokens"], ["logits"], axis=0)],
        "table_lm",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "time", V])],
        [numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _numpy_pick(lp: np.ndarray, samplers: list[Sampler]) -> np.ndarray:
    """What the decode loop does without a head."""
    tokens = np.argmax(lp, axis=-1)
    rows = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if rows:
        tokens[rows] = sample_rows(lp[rows], [samplers[i] for i in rows])
    return tokens


def _session(table: np.ndarray) -> ort.InferenceSession:
    graph = decode_head.attach(_table_lm(table), "logits")
    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


def _head_pick(table: np.ndarray, x: np.ndarray, samplers: list[Sampler]):
    rows = RowParams.of([s.params for s in samplers], V)
    feeds = {"tokens": x, **rows.feeds}
    if rows.kind != "greedy":
        feeds[decode_head.UNIFORM] = np.array(
            [0.0 if s.params.greedy else s.uniform() for s in samplers]
        )
    return _session(table).run([decode_head.TOKEN, decode_head.LOGPROB], feeds)


def _random_params(rng: np.random.Generator, seed: int) -> SamplingParams:
    if rng.random() < 0.2:
        return SamplingParams()
    return SamplingParams(
        temperature=float(rng.choice([0.3, 0.7, 1.0, 1.5, 5.0])),
        top_k=int(rng.choice([0, 0, 1, 3, V])),
        top_p=float(rng.choice([0.0, 0.0, 0.5, 0.9, 1.0])),
        seed=seed,
    )


@pytest.mark.parametrize("trial", range(40))
def test_head_picks_what_numpy_picks(trial: int) -> None:
    rng = np.random.default_rng(trial)
    table = rng.normal(0, 3, size=(8, V))
    table[1, :4] = table[1, 0]  # ties: both sides rank them by id
    table[2] = 0.0  # a uniform row
    batch = 16
    x = rng.integers(0, 8, size=(batch, 1))
    params = [_random_params(rng, trial * 100 + i) for i in range(batch)]
    if trial % 4 == 0:
        params = [SamplingParams() for _ in range(batch)]  # the greedy head
    elif trial % 4 == 1:
        params = [SamplingParams(temperature=p.temperature or 1.0, seed=i)
                  for i, p in enumerate(params)]  # fmt: skip  # the tempered head
    lp = log_softmax(table[x[:, -1]].astype(np.float32))
    want = _numpy_pick(lp, [Sampler(p) for p in params])
    tokens, logprobs = _head_pick(table, x, [Sampler(p) for p in params])
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_allclose(logprobs, lp[np.arange(batch), want], rtol=1e-5, atol=1e-6)


def test_head_applies_top_p_to_what_top_k_kept() -> None:
    """As the numpy sampler: top-p over the top-k survivors renormalised, so with top-k 2 of
    [0.4, 0.3, 0.2, 0.1] and top-p 0.5 only the first token is left, whatever the draw."""
    table = np.log(np.full((1, V), 1e-6))
    table[0, :4] = np.log([0.4, 0.3, 0.2, 0.1])
    params = SamplingParams(temperature=1.0, top_k=2, top_p=0.5)
    rows = RowParams.of([params], V)
    feeds = {"tokens": np.zeros((1, 1), np.int64), **rows.feeds,
             decode_head.UNIFORM: np.array([0.9])}  # fmt: skip
    tokens, _ = _session(table).run([decode_head.TOKEN, decode_head.LOGPROB], feeds)
    assert tokens.tolist() == [0]


def test_head_uses_the_last_time_step() -> None:
    table = np.eye(V)[::-1] * 5  # token t -> most likely V-1-t
    x = np.array([[0, 3, 7]])
    tokens, _ = _head_pick(table, x, [Sampler(SamplingParams())])
    assert tokens.tolist() == [V - 1 - 7]


def test_kind_follows_the_batch() -> None:
    greedy, tempered = SamplingParams(), SamplingParams(temperature=0.9)
    assert RowParams.of([greedy, greedy], V).kind == "greedy"
    assert RowParams.of([greedy, tempered], V).kind == "tempered"
    assert RowParams.of([tempered, SamplingParams(temperature=1, top_k=V)], V).kind == "tempered"
    assert RowParams.of([tempered, SamplingParams(temperature=1, top_k=2)], V).kind == "filtered"
    assert RowParams.of([tempered, SamplingParams(temperature=1, top_p=0.5)], V).kind == (
        "filtered"
    )


def test_each_branch_reads_only_what_it_needs() -> None:
    """ORT runs only the If branch taken; each reads just the inputs of its way to choose."""
    graph = decode_head.attach(_table_lm(np.zeros((2, V))), "logits").graph

    def reads(g) -> set[str]:
        names = {i for n in g.node for i in n.input}
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    names |= reads(a.g)
        return names & set(decode_head.HEAD_INPUTS)

    head = next(n for n in graph.node if n.op_type == "If")
    branches = {a.name: a.g for a in head.attribute}
    assert reads(branches["then_branch"]) == set()  # greedy
    sampled = {a.name: a.g for a in branches["else_branch"].node[0].attribute}
    assert reads(sampled["then_branch"]) == set(decode_head.HEAD_INPUTS)  # filtered
    assert reads(sampled["else_branch"]) == {decode_head.TEMPERATURE, decode_head.UNIFORM}


def test_plain_calls_need_no_head_inputs() -> None:
    """Score and prefill-style calls feed only the model's inputs: the defaults pick the
    greedy branch."""
    table = np.random.default_rng(0).normal(size=(4, V))
    logits, token = _session(table).run(["logits", decode_head.TOKEN], {"tokens": [[1, 3]]})
    assert logits.shape == (1, 2, V)
    assert token.tolist() == [int(np.argmax(table[3]))]


def test_graphs_the_head_does_not_fit_are_left_to_numpy() -> None:
    table = np.zeros((2, V))
    assert decode_head.attach(_table_lm(table, opset=12), "logits") is None
    assert decode_head.attach(_table_lm(table), "not_an_output") is None


@pytest.mark.parametrize("top_k", [0, 2])
def test_head_follows_a_tiny_temperature_to_the_argmax(top_k: int) -> None:
    """lp / t overflowed to -inf everywhere below t ~ 1e-308, the softmax became nan and the
    head drew token 0, here masked; shifted by the max first it picks the argmax."""
    table = np.full((1, V), -np.inf)
    table[0, 3], table[0, 5], table[0, 7] = 1.0, 2.0, 1.5
    params = SamplingParams(temperature=1e-310, top_k=top_k)
    rows = RowParams.of([params] * 4, V)
    uniforms = np.array([0.0, 0.3, 0.7, 0.999])
    feeds = {"tokens": np.zeros((4, 1), np.int64), **rows.feeds, decode_head.UNIFORM: uniforms}
    tokens, logprobs = _session(table).run([decode_head.TOKEN, decode_head.LOGPROB], feeds)
    assert tokens.tolist() == [5] * 4
    assert np.isfinite(logprobs).all()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.3, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.7),
        SamplingParams(temperature=0.5, top_k=5, top_p=0.9),
    ],
)
def test_head_draws_what_numpy_draws_for_the_same_uniforms(params: SamplingParams) -> None:
    """Thousands of rows of random logits (masked -inf tokens and ties among them), one
    uniform each: the head picks exactly numpy's token, never a masked one."""
    rng = np.random.default_rng(5)
    table = rng.normal(0, 2, size=(16, V))
    table[:, 0] = -np.inf  # masked in every row
    table[3, 1:6] = table[3, 1]  # ties
    n = 4000
    x = rng.integers(0, 16, size=(n, 1))
    uniforms = rng.random(n)
    lp = log_softmax(table[x[:, -1]].astype(np.float32))
    want = draw_rows(lp, [params] * n, uniforms)
    rows = RowParams.of([params] * n, V)
    feeds = {"tokens": x, **rows.feeds, decode_head.UNIFORM: uniforms}
    tokens, _ = _session(table).run([decode_head.TOKEN, decode_head.LOGPROB], feeds)
    np.testing.assert_array_equal(tokens, want)
    assert not (tokens == 0).any()
