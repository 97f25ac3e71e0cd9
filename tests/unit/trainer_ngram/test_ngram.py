"""n-gram LM: the dense table against the dict reference, the graph, perplexity, limits."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.ngram import (
    BOS_ID,
    MAX_TABLE_ENTRIES,
    NEVER_LOGPROB,
    NOT_TEXT_IDS,
    NgramConfig,
    NgramCounts,
    dense_log_probs,
    train_ngram,
)
from tests.memory import address_space_cap

V = 7


def random_ids(length: int, seed: int, vocab: int = V) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, vocab) for _ in range(length)]  # reserved ids 0..3 unused


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_dense_table_equals_dict_reference(n: int, alpha: float) -> None:
    ids = random_ids(300, seed=n)
    config = NgramConfig(vocab_size=V, n=n, alpha=alpha)
    table = dense_log_probs(ids, config)
    ref = NgramCounts.fit(ids, config)
    assert table.shape == (V ** (n - 1), V)
    for row, context in enumerate(itertools.product(range(V), repeat=n - 1)):
        want = [math.log(ref.prob(context, w)) for w in range(V)]
        np.testing.assert_allclose(table[row], want, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    ids=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    n=st.integers(1, 3),
    alpha=st.floats(0.01, 5.0),
)
def test_dense_table_matches_reference_property(ids: list[int], n: int, alpha: float) -> None:
    config = NgramConfig(vocab_size=5, n=n, alpha=alpha)
    table = np.exp(dense_log_probs(ids, config).astype(np.float64))
    np.testing.assert_allclose(table.sum(axis=1), 1.0, rtol=1e-5)
    ref = NgramCounts.fit(ids, config)
    padded = [BOS_ID] * (n - 1) + ids
    for i, w in enumerate(ids):  # every observed context row, the observed word
        context = padded[i : i + n - 1]
        row = 0
        for c in context:
            row = row * 5 + c
        assert table[row, w] == pytest.approx(ref.prob(context, w), rel=1e-5)


def test_laplace_formula_by_hand() -> None:
    # bigram contexts: <bos>->4, 4->5, 5->4, 4->4; so count(4)=2, count(4,5)=1
    ref = NgramCounts.fit([4, 5, 4, 4], NgramConfig(vocab_size=6, n=2, alpha=1.0))
    assert ref.prob([4], 5) == pytest.approx((1 + 1) / (2 + 6))
    assert ref.prob([4], 3) == pytest.approx((0 + 1) / (2 + 6))
    assert ref.prob([3], 3) == pytest.approx(1 / 6)  # unseen context: uniform
    assert ref.prob([BOS_ID], 4) == pytest.approx((1 + 1) / (1 + 6))


def test_tokens_that_never_follow_take_no_smoothing_mass() -> None:
    """<pad>, <bos> and <eos> never follow in text: probability 0, and V of the formula counts
    only the tokens that can (here <unk> 0 and ids 4, 5: V = 3)."""
    config = NgramConfig(vocab_size=6, n=2, alpha=1.0, excluded=NOT_TEXT_IDS)
    ref = NgramCounts.fit([4, 5, 4, 4], config)
    assert ref.prob([4], 5) == pytest.approx((1 + 1) / (2 + 3))
    assert ref.prob([4], 0) == pytest.approx((0 + 1) / (2 + 3))
    assert ref.prob([4], BOS_ID) == 0.0
    table = np.exp(dense_log_probs([4, 5, 4, 4], config).astype(np.float64))
    np.testing.assert_allclose(table.sum(axis=1), 1.0, rtol=1e-6)
    assert (table[:, list(NOT_TEXT_IDS)] == 0).all()
    assert table[4, 5] == pytest.approx(ref.prob([4], 5), rel=1e-6)
    with pytest.raises(TrainerError, match="excluded"):
        NgramCounts.fit([4, BOS_ID, 5], config)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_forward_gives_reference_log_probs_and_carries_context(n: int) -> None:
    train = random_ids(400, seed=10 + n)
    model = train_ngram(train, V, n=n, alpha=0.5).eval()
    ref = NgramCounts.fit(train, NgramConfig(V, n, 0.5, excluded=NOT_TEXT_IDS))
    seq = random_ids(12, seed=99)
    tokens = torch.tensor([seq])  # [1, time]
    (context,) = model.initial_state(1)
    assert context.tolist() == [[BOS_ID] * max(n - 1, 1)]
    logits, next_context = model(tokens, context)
    assert logits.shape == (1, len(seq), V)
    padded = [BOS_ID] * (n - 1) + seq
    for t in range(len(seq)):  # logits[t] predicts the token after seq[t]
        window = padded[: n + t]  # <bos> padding and seq[..t]
        want = [math.log(p) if (p := ref.prob(window, w)) else NEVER_LOGPROB for w in range(V)]
        np.testing.assert_allclose(logits[0, t].numpy(), want, rtol=1e-5, atol=1e-5)
    # two calls with the state carried equal one call
    first, mid = model(tokens[:, :5], context)
    second, end = model(tokens[:, 5:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), logits)
    torch.testing.assert_close(end, next_context)
    if n > 1:
        assert next_context.tolist() == [seq[-(n - 1) :]]


def test_batched_forward_equals_per_row() -> None:
    model = train_ngram(random_ids(200, 3), V, n=3, alpha=1.0).eval()
    tokens = torch.tensor([random_ids(9, 4), random_ids(9, 5)])  # [2, 9]
    context = torch.tensor([[BOS_ID, BOS_ID], [5, 6]])
    logits, nxt = model(tokens, context)
    for b in range(2):
        one, one_next = model(tokens[b : b + 1], context[b : b + 1])
        torch.testing.assert_close(logits[b : b + 1], one)
        torch.testing.assert_close(nxt[b : b + 1], one_next)


def test_perplexity_graph_equals_reference_and_orders_sensibly() -> None:
    text = random_ids(2000, seed=7)
    # a corpus with structure: a repeating pattern a bigram model captures exactly
    pattern = [4, 5, 6, 4, 6, 5] * 300
    train, held = pattern[:1500], pattern[1500:]
    for n in (1, 2, 3):
        model = train_ngram(train, V, n=n, alpha=0.1)
        ref = NgramCounts.fit(train, NgramConfig(V, n, 0.1, excluded=NOT_TEXT_IDS))
        assert model.perplexity(held) == pytest.approx(ref.perplexity(held), rel=1e-5)
    ppl = [train_ngram(train, V, n=n, alpha=0.1).perplexity(held) for n in (1, 2, 3)]
    assert ppl[0] > ppl[1] > ppl[2]  # more context, better on this pattern
    assert ppl[2] < 1.5  # the trigram model almost knows the pattern
    # a huge alpha washes out the counts: perplexity tends to the uniform baseline over the
    # tokens that can follow (V less <pad>, <bos> and <eos>)
    flat = train_ngram(text, V, n=2, alpha=1e9)
    assert flat.perplexity(text[:300]) == pytest.approx(V - len(NOT_TEXT_IDS), rel=1e-3)


def test_perplexity_of_a_long_split_at_a_large_vocabulary_needs_no_logits_table() -> None:
    """The validation perplexity ran the graph's forward: logits [len(ids), V] (a word-level
    split of 700k ids at V = 140k asked for 400 GB and crashed `train` with a traceback).
    Only the observed ids' log-probabilities are needed."""
    vocab = 50_000
    train = random_ids(2_000, seed=1, vocab=vocab)
    held = random_ids(100_000, seed=2, vocab=vocab)  # logits would be 20 GB
    model = train_ngram(train, vocab, n=1, alpha=0.5)
    with address_space_cap(1 << 30):
        got = model.perplexity(held)
    ref = NgramCounts.fit(train, NgramConfig(vocab, 1, 0.5, excluded=NOT_TEXT_IDS))
    assert got == pytest.approx(ref.perplexity(held), rel=1e-5)


def test_perplexity_with_an_excluded_id_is_infinite_in_both() -> None:
    """<eos> has probability 0: the graph's perplexity must be inf like the reference's, not
    an OverflowError (exp(1e4 / 2)) or an arbitrary huge number from NEVER_LOGPROB."""
    train = random_ids(200, seed=3)
    model = train_ngram(train, V, n=2, alpha=1.0)
    ref = NgramCounts.fit(train, NgramConfig(V, 2, 1.0, excluded=NOT_TEXT_IDS))
    for ids in ([4, 3], [3], [4, 5] * 30 + [3]):
        assert ref.perplexity(ids) == math.inf
        assert model.perplexity(ids) == math.inf


def test_tiny_alpha_keeps_log_probs_finite_and_normalised() -> None:
    """alpha / (count + alpha V) underflows to 0 for a subnormal alpha; its log does not."""
    train = [4, 5, 4, 5, 4, 6]
    alpha = 5e-324
    config = NgramConfig(V, 2, alpha, excluded=NOT_TEXT_IDS)
    table = dense_log_probs(train, config)
    allowed = [i for i in range(V) if i not in NOT_TEXT_IDS]
    assert np.isfinite(table).all()
    np.testing.assert_allclose(np.exp(table[:, allowed].astype(np.float64)).sum(1), 1, rtol=1e-5)
    ref = NgramCounts.fit(train, config)
    assert math.isfinite(ref.log_likelihoods([4, 4])[1])  # unseen bigram: ~ -745, not -inf
    # every step unseen: a mean NLL (~745) past exp()'s range is inf, not an OverflowError
    assert ref.perplexity([5, 5]) == math.inf
    assert train_ngram(train, V, n=2, alpha=alpha).perplexity([5, 5]) == math.inf


def test_refuses_table_over_the_limit() -> None:
    vocab = 4097  # 4097^2 > 2**24
    assert vocab**2 > MAX_TABLE_ENTRIES
    with pytest.raises(TrainerError, match=r"exceeds the dense export limit"):
        train_ngram([4, 5, 6], vocab, n=2, alpha=1.0)
    # the flags to change, with the numbers ("a smaller n ... e.g. char level" named no flag
    # and told a char-level run to go char level)
    with pytest.raises(TrainerError) as err:
        train_ngram([4, 5, 6], vocab, n=2, alpha=1.0)
    assert str(err.value).endswith(
        "use --n 1, or raise --min-freq until the vocabulary has at most 4,096 tokens for --n 2"
    )
    with pytest.raises(TrainerError, match=r"use --n 4 or lower, .* at most 27 tokens for --n 5"):
        train_ngram([4, 5, 6], 31, n=5, alpha=1.0)  # char level, letters only
    # the dict reference still works for any size (benchmarks use it for large n)
    ref = NgramCounts.fit([4, 5, 6, 4, 5], NgramConfig(vocab, 5, 1.0))
    assert ref.perplexity([4, 5, 6]) > 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ids": [], "vocab_size": V, "n": 2, "alpha": 1.0}, "empty corpus"),
        ({"ids": [4, 5], "vocab_size": V, "n": 0, "alpha": 1.0}, "n must be >= 1"),
        ({"ids": [4, 5], "vocab_size": V, "n": 2, "alpha": 0.0}, "alpha must be a positive"),
        ({"ids": [4, 9], "vocab_size": V, "n": 2, "alpha": 1.0}, "outside the vocabulary"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(TrainerError, match=message):
        train_ngram(**kwargs)


def test_state_spec_describes_initial_state() -> None:
    for n in (1, 3):
        model = train_ngram(random_ids(50, 1), V, n=n, alpha=1.0)
        (spec,) = model.state_specs()
        (state,) = model.initial_state(3)
        assert spec.dtype == "int64" and spec.batch_axis == 0
        assert spec.shape == [-1, state.shape[1]]
        assert (state == spec.init).all()
        assert model.hyperparameters()["n"] == n


@pytest.mark.parametrize("length", [0, 1, 2])
def test_a_context_shorter_than_n_minus_1_is_bos_padded_as_the_graph_does(length: int) -> None:
    """prob(context) took the last n-1 ids with a negative slice start, so a shorter context
    such as [] (the first token) or [x_0] matched no count and got the uniform 1/V, while the
    graph, after the same prefix from its <bos> state, gives p(w | <bos>.., prefix)."""
    train = random_ids(400, seed=3)
    model = train_ngram(train, V, n=4, alpha=0.5).eval()
    ref = NgramCounts.fit(train, NgramConfig(V, 4, 0.5, excluded=NOT_TEXT_IDS))
    prefix = train[:length]  # the text's own start: its <bos>-padded contexts were counted
    (state,) = model.initial_state(1)
    if prefix:
        logits, _ = model(torch.tensor([prefix]), state)
        want = logits[0, -1].double().exp().numpy()
    else:
        want = np.exp(np.array(model.start_log_probs()))
    got = [ref.prob(prefix, w) for w in range(V)]
    assert max(got) > 1.5 / ref.config.outcomes  # a counted row, not the uniform one
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert ref.log_prob(prefix, train[length]) == pytest.approx(math.log(got[train[length]]))
