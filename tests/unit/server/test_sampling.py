"""Pure sampling: greedy ties, top-k/top-p filtering, seeded reproducibility, validation."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.server.errors import BadRequest
from rnnserve.server.sampling import Sampler, SamplingParams, filtered_probs, greedy_token


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
        (SamplingParams(top_k=11), "sampling.top_k"),
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
