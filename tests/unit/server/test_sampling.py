"""Pure sampling: greedy ties, top-k/top-p filtering, seeded reproducibility, validation."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.server.errors import BadRequest
from rnnserve.server.sampling import (
    Sampler,
    SamplingParams,
    choose_tokens,
    draw_rows,
    filtered_probs,
    greedy_token,
)


def _logprobs(values: list[float]) -> np.ndarray:
    z = np.asarray(values, dtype=np.float64)
    return (z - np.log(np.exp(z).sum())).astype(np.float32)


def test_greedy_breaks_ties_to_lowest_id() -> None:
    assert greedy_token(_logprobs([0.0, 2.0, 2.0, 1.0])) == 1


def test_temperature_zero_is_greedy_whatever_the_seed() -> None:
    lp = _logprobs([0.1, 0.3, 3.0, 0.2])
    picks = {Sampler(SamplingParams(seed=s)).pick(lp) for s in range(20)}
    assert picks == {2}


def test_top_k_keeps_only_k_most_likely() -> None:
    probs = filtered_probs(_logprobs([1.0, 4.0, 3.0, 2.0]), SamplingParams(1.0, top_k=2))
    assert set(np.flatnonzero(probs)) == {1, 2}
    assert probs.sum() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    lp = np.log(np.asarray([0.5, 0.3, 0.15, 0.05]))
    probs = filtered_probs(lp, SamplingParams(1.0, top_p=0.7))
    assert set(np.flatnonzero(probs)) == {0, 1}


def test_top_p_applies_to_what_top_k_kept_renormalised() -> None:
    """Top-k, then top-p over the renormalised survivors, as HF, vLLM and llama.cpp do: of
    [0.4, 0.3, 0.2, 0.1], top-k 2 leaves [0.57, 0.43], whose first token alone reaches 0.5."""
    lp = np.log(np.asarray([0.4, 0.3, 0.2, 0.1]))
    probs = filtered_probs(lp, SamplingParams(1.0, top_k=2, top_p=0.5))
    assert set(np.flatnonzero(probs)) == {0}
    probs = filtered_probs(lp, SamplingParams(1.0, top_k=3, top_p=0.5))  # 0.44 < 0.5: two
    assert set(np.flatnonzero(probs)) == {0, 1}


def test_same_seed_same_sequence_different_seed_differs() -> None:
    lp = _logprobs([0.0] * 50)

    def run(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler.pick(lp) for _ in range(30)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert len(set(run(7))) > 5  # really sampling, not argmax


def test_sampled_frequencies_follow_the_distribution() -> None:
    target = np.asarray([0.6, 0.3, 0.1])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    counts = np.bincount([sampler.pick(np.log(target)) for _ in range(4000)], minlength=3)
    assert np.allclose(counts / counts.sum(), target, atol=0.04)


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(temperature=-1), "sampling.temperature"),
        (SamplingParams(temperature=float("nan")), "sampling.temperature"),
        (SamplingParams(temperature=101), "sampling.temperature"),
        (SamplingParams(top_k=-1), "sampling.top_k"),
        (SamplingParams(top_p=1.5), "sampling.top_p"),
        (SamplingParams(top_p=float("inf")), "sampling.top_p"),
    ],
)
def test_validation_names_the_field(params: SamplingParams, field: str) -> None:
    with pytest.raises(BadRequest) as err:
        params.validate(vocab_size=10)
    assert err.value.field == field


def test_peeked_blocks_follow_the_same_sequence_as_single_draws() -> None:
    """A decode trip peeks a block of uniforms and uses only the steps it ran; the stream's
    sequence is the generator's, however it is blocked."""
    plain = np.random.Generator(np.random.PCG64(7))
    want = [plain.random() for _ in range(12)]
    s = Sampler(SamplingParams(temperature=1.0, seed=7))
    got = [s.uniform()]
    got += list(s.peek(5)[:3])
    s.use(3)  # a trip of 3 steps that had peeked 5
    got += list(s.peek(2))
    s.use(2)
    got += [s.uniform() for _ in range(6)]
    assert got == want


@pytest.mark.parametrize("temperature", [1e-3, 1e-300, 1e-310, 5e-324])
def test_a_tiny_temperature_tends_to_greedy(temperature: float) -> None:
    """logprobs / t overflowed to -inf for every token below t ~ 1e-308 (a valid JSON
    temperature), the softmax became nan and every draw landed on token 0, here masked."""
    lp = _logprobs([-np.inf, 2.0, 1.0, 1.9])
    probs = filtered_probs(lp, SamplingParams(temperature))
    np.testing.assert_allclose(probs, [0.0, 1.0, 0.0, 0.0], atol=1e-30)
    picks = {Sampler(SamplingParams(temperature, seed=s)).pick(lp) for s in range(20)}
    assert picks == {1}


def test_a_tiny_temperature_splits_ties_evenly() -> None:
    probs = filtered_probs(_logprobs([1.0, 3.0, 3.0, 2.0]), SamplingParams(1e-310))
    np.testing.assert_array_equal(probs, [0.0, 0.5, 0.5, 0.0])


def _nucleus(probs: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The target, by definition: the top_k most likely (ties to the lowest id), renormalised,
    then the smallest most-likely-first prefix of those whose mass reaches top_p (so the
    token that crosses top_p is in), renormalised."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    kept = order[: top_k or len(probs)]
    if 0.0 < top_p < 1.0:
        mass, total, nucleus = 0.0, sum(probs[i] for i in kept), []
        for i in kept:
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += probs[i] / total
        kept = nucleus
    out = np.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


def _chi2_bound(dof: int, z: float = 4.75) -> float:
    """Chi-square critical value for about p = 1e-6 (Wilson-Hilferty; no scipy here)."""
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


LOGITS = [*np.log([0.30, 0.22, 0.16, 0.12, 0.09, 0.06, 0.05, 1e-9]).tolist(), -np.inf]


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, 0, 0.0),
        (0.6, 0, 0.0),
        (1.7, 0, 0.0),
        (1.0, 3, 0.0),  # an off-by-one in top_k moves ~1/5 of the mass
        (1.0, 4, 0.0),
        (1.0, 0, 0.50),  # 0.30 + 0.22 = 0.52 crosses 0.5: two tokens
        (1.0, 0, 0.53),  # three
        (1.0, 0, 0.99),  # all but the 1e-9 one: the nucleus reaches 0.99 before it
        (1.0, 5, 0.75),  # top 5 renormalised: 0.34, 0.25, 0.18 reach 0.76: three tokens
        (2.0, 6, 0.9),
        (1.0, 8, 0.0),  # top_k = every token that is not masked
        (1.0, 9, 0.0),  # top_k = the vocabulary: no limit
    ],
)
def test_draws_follow_the_exact_filtered_distribution(
    temperature: float, top_k: int, top_p: float
) -> None:
    """Many draws from one logit vector: the tokens drawn are exactly the target's support
    (the masked -inf token never) and their counts pass a chi-square test against the
    renormalised target computed from its definition."""
    lp = _logprobs(LOGITS)
    tempered = np.exp(lp.astype(np.float64) / temperature)
    want = _nucleus(tempered / tempered.sum(), top_k, top_p)
    params = SamplingParams(temperature, top_k, top_p, seed=3)
    np.testing.assert_allclose(filtered_probs(lp, params), want, rtol=1e-9, atol=1e-15)
    n = 60_000
    sampler = Sampler(params)
    uniforms = [sampler.uniform() for _ in range(n)]
    drawn = draw_rows(np.repeat(lp[None, :], n, axis=0), [params] * n, np.array(uniforms))
    counts = np.bincount(drawn, minlength=len(lp))
    big = want * n >= 5  # the chi-square's cells; a kept token is drawn ~5 times at least
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(want))
    assert set(np.flatnonzero(counts)) >= set(np.flatnonzero(big))
    if big.sum() > 1:
        expected = want[big] * n
        chi2 = float((((counts[big] - expected) ** 2) / expected).sum())
        assert chi2 < _chi2_bound(int(big.sum()) - 1), (counts, expected)


def test_top_k_over_tied_tokens_keeps_the_lowest_ids() -> None:
    probs = filtered_probs(_logprobs([0.0, 1.0, 1.0, 1.0, 1.0]), SamplingParams(1.0, top_k=2))
    np.testing.assert_allclose(probs, [0.0, 0.5, 0.5, 0.0, 0.0])


def test_masked_tokens_are_never_drawn_even_at_the_ends_of_the_unit_interval() -> None:
    """side="right" skips zero-probability ids at u = 0; rounding past the total lands on
    the last possible id, not on a masked one after it."""
    lp = _logprobs([-np.inf, 0.0, -np.inf, 1.0, -np.inf])
    params = [SamplingParams(1.0), SamplingParams(1.0, top_k=1), SamplingParams(1.0, top_p=0.5)]
    for u in (0.0, 0.5, np.nextafter(1.0, 0.0)):
        for p in params:
            token = int(draw_rows(lp[None, :], [p], np.array([u]))[0])
            assert token in (1, 3), (u, p, token)


def test_a_seeded_stream_draws_the_same_tokens_whatever_shares_its_batch() -> None:
    """Alone, or beside greedy rows, dropped rows (None) and a top-k row with its own seed
    (which makes the batch take the filtered path): the same tokens, step after step."""
    rng = np.random.default_rng(0)
    steps = [np.log(rng.dirichlet(np.ones(20), size=4)) for _ in range(40)]

    def tokens(batch: bool) -> list[int]:
        mine = Sampler(SamplingParams(1.3, seed=42))
        others = [
            Sampler(SamplingParams()),
            None,
            Sampler(SamplingParams(0.8, top_k=3, seed=7)),
        ]
        out = []
        for lp in steps:
            if batch:
                out.append(int(choose_tokens(lp, [others[0], mine, others[1], others[2]])[1]))
            else:
                out.append(int(choose_tokens(lp[1:2], [mine])[0]))
        return out

    alone = tokens(batch=False)
    assert alone == tokens(batch=True)
    assert len(set(alone)) > 5  # really sampling


def test_a_top_k_over_the_vocabulary_keeps_it_all() -> None:
    """top_k 50 (a common client default) against a 31-token char model was a 400; HF, vLLM
    and TGI take k >= vocab as no limit, and so do both choice paths now."""
    import numpy as np

    from rnnserve.server.decode_head import RowParams
    from rnnserve.server.sampling import filtered_rows

    lp = np.log(np.array([[0.5, 0.3, 0.2]]))
    over, off = SamplingParams(temperature=1, top_k=50), SamplingParams(temperature=1)
    assert over.validate(vocab_size=3) is over
    assert np.array_equal(filtered_rows(lp, [over]), filtered_rows(lp, [off]))
    assert RowParams.of([over], 3).feeds == RowParams.of([off], 3).feeds
