"""The benchmarks' methods: each figure divided by a ceiling or baseline measured the same way
and paired within one round, and no set-up inside a timed span. No timing is asserted: the
measurements are replaced by canned numbers, and the arithmetic on them is checked."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench import distributed, failover, serve

# tokens/s per round: a busy spell in round 0 slows both configurations alike, one in round 2
# only the second; the paired ratios are 0.9, 0.95, 0.58 (median 0.9), the ratio of the two
# medians 60 / 100 = 0.6: it divides runs of different rounds
BASE_ROUNDS = [50.0, 100.0, 104.0]
OTHER_ROUNDS = [45.0, 95.0, 60.0]


def test_distributed_speedup_pairs_the_runs_of_one_round(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: dict[tuple[int, int], int] = {}

    def launch(world: int, threads: int, steps: int) -> dict:
        i = calls[(world, threads)] = calls.get((world, threads), -1) + 1
        rate = {(1, 1): BASE_ROUNDS, (1, 2): BASE_ROUNDS, (2, 1): OTHER_ROUNDS}[(world, threads)]
        row = {"tokens_per_s": rate[i], "params": 1000, "global_batch": 64, "num_steps": 64}
        if world == 2:
            row.update(grad_allreduce_ms=1.0, loss_allreduce_ms=0.2)
        return {name: dict(row) for name in distributed.MODELS}

    monkeypatch.setattr(distributed, "launch", launch)
    monkeypatch.setattr(distributed, "plot", lambda result, path: None)
    monkeypatch.setattr(distributed, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["distributed.py", "--repeats", "3"])
    assert distributed.main() == 0
    models = json.loads((tmp_path / "distributed.json").read_text())["models"]
    assert {m["speedup_2_ranks_vs_1x1"] for m in models.values()} == {0.9}


def test_checkpoint_cost_pairs_rounds_and_counts_the_tokens_received(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CPU per token divides by the tokens the streams received (it used tokens/s times a
    span that also held the client's set-up), and each ratio to "none" pairs the runs of a
    round."""
    seconds = 2.0
    # per run, in the order they are made: warm-up, then (none, every_16) three times
    rates = [70.0, *(x for pair in zip(BASE_ROUNDS, OTHER_ROUNDS, strict=True) for x in pair)]
    cpu_us = [10.0, 10.0, 12.0, 20.0, 13.0, 11.0, 22.0]
    clock = {"cpu_s": 0.0, "run": 0}

    async def tokens_and_seconds(address: str, streams: int, every: int, secs: float):
        i = clock["run"]
        clock["run"] += 1
        tokens = int(rates[i] * seconds)
        clock["cpu_s"] += tokens * cpu_us[i] / 1e6
        return tokens, seconds

    monkeypatch.setattr(failover, "_tokens_and_seconds", tokens_and_seconds)
    monkeypatch.setattr(failover, "process_cpu_s", lambda pid: clock["cpu_s"])
    replica = SimpleNamespace(proc=SimpleNamespace(pid=1), address="127.0.0.1:1")
    got = failover.checkpoint_cost(replica, 32, [16], seconds)
    assert got["server_cpu_us_per_token_runs"] == {"none": [10.0, 20.0, 11.0],
                                                   "every_16": [12.0, 13.0, 22.0]}  # fmt: skip
    assert got["tokens_per_s_runs"] == {"none": [50, 100, 104], "every_16": [45, 95, 60]}
    assert got["throughput_ratio_to_none"] == {"every_16": 0.9}  # not 60 / 100
    assert got["cpu_ratio_to_none"] == {"every_16": 1.2}  # 1.2, 0.65, 2.0; not 13 / 11


class _RecordingModel:
    """The server's OnnxModel for scoring.py: records the time steps of each call."""

    def __init__(self, vocab: int) -> None:
        self.specs: list = []  # no state outputs: one call per text
        self.vocab, self.steps = vocab, []

    def initial_state(self, rows: int) -> list:
        return []

    def run(self, x: np.ndarray, state: list):
        self.steps.append(x.shape[1])
        return np.zeros((x.shape[0], x.shape[1], self.vocab), np.float32), state


def test_bare_score_feeds_the_steps_the_server_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bare Score loop is the ceiling of the server's Score: it fed every token of a text
    (n steps) where the server feeds n - 1 (the last token predicts nothing)."""
    from rnnserve.server.scoring import _score_sync

    vocab = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c"]
    fed: list[int] = []

    class Session:
        def run(self, outputs, feeds):
            fed.append(feeds["x"].shape[1])
            return [np.zeros((1, feeds["x"].shape[1], len(vocab)), np.float32)]

    m = SimpleNamespace(vocab=vocab, input_name="x", output_name="logits", state=[])
    monkeypatch.setattr(serve, "ort_session", lambda package: (Session(), m))
    texts = ["abcab", "cba"]
    serve.bare_score(Path("unused"), texts)
    server = _RecordingModel(len(vocab))
    for text in texts:
        _score_sync(server, [[vocab.index(c) for c in text]], 0, len(vocab))
    assert fed[1:] == server.steps == [4, 2]  # fed[0]: the untimed warm-up call


class _Channel:
    """A grpc.aio channel that connects at its first call, or when channel_ready is awaited."""

    def __init__(self) -> None:
        self.connected = False

    async def channel_ready(self) -> None:
        self.connected = True

    async def close(self) -> None:
        pass


def test_generate_waves_connect_every_channel_before_the_timed_wave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 64 streams and more the wave spreads over several channels; only the first was
    used by the warm-up, so the others' streams waited for a connection inside the wave."""
    from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    unconnected: list[_Channel] = []

    class Stub:
        def __init__(self, channel: _Channel) -> None:
            self.channel = channel

        def Generate(self, request, timeout):
            if not self.channel.connected:
                unconnected.append(self.channel)
                self.channel.connected = True

            async def stream():
                for _ in range(2):
                    yield SimpleNamespace(token_ids=[5])

            return stream()

    monkeypatch.setattr(serve, "own_channel", lambda address: _Channel())
    monkeypatch.setattr(pb_grpc, "InferenceStub", Stub)
    row = asyncio.run(serve.generate_level(1, "lstm", 64, 2))
    assert row["tokens"] == 128
    assert unconnected == []
