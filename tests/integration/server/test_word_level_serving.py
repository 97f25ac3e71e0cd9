"""A word-level model served as users call it: gRPC Generate's text, stop strings across a
word boundary, Score of unknown words, and /v1/completions logprobs offsets in the text as
sent (the tiny zoo and most tests are character level)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest

from rnnserve.artifact.manifest import Manifest
from rnnserve.server.text import TextCodec
from rnnserve.trainer import cli
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.http.conftest import http_server
from tests.integration.server.harness import ServerThread

CORPUS = (
    "The Time Traveller (for so it will be convenient to speak of him) was expounding.\n"
    '"It\'s against reason," said Filby. "You can\'t show me 4 dimensions, can you?"\n'
    "Wait... it's late, isn't it? Yes, it's late.\n"
) * 20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, TextCodec]]:
    """A word-level trigram (trained in about a second) behind gRPC and HTTP."""
    root = tmp_path_factory.mktemp("word-serving")
    (root / "corpus.txt").write_text(CORPUS)
    args = ["train", "--arch", "ngram", "--n", "3", "--alpha", "0.01", "--level", "word",
            "--keep-punctuation", "--corpus", str(root / "corpus.txt"),
            "--out", str(root / "models"), "--name", "w", "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    codec = TextCodec(Manifest.load(root / "models" / "w" / "1"))
    server = http_server(root / "models")
    try:
        yield server, codec
    finally:
        server.stop()


def _completions(server: ServerThread, body: dict) -> dict:
    assert server.app is not None and server.app.http is not None
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.app.http.port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def _generate(server: ServerThread, **fields) -> tuple[str, list[int], int]:
    request = pb.GenerateRequest(model="w", sampling=pb.SamplingParams(temperature=0), **fields)
    replies = list(server.stub.Generate(request, timeout=30))
    text = "".join(r.text for r in replies)
    return text, [i for r in replies for i in r.token_ids], replies[-1].finish_reason


def test_streamed_text_is_each_word_after_a_space(served) -> None:
    server, codec = served
    text, ids, finish = _generate(server, prompt="The Time", max_tokens=6)
    assert text == "".join(codec.piece(i) for i in ids) == " traveller ( for so it will"
    assert finish == pb.FINISH_REASON_LENGTH


def test_a_stop_string_across_a_word_boundary_is_cut_from_the_text(served) -> None:
    server, _ = served
    text, ids, finish = _generate(server, prompt="The Time", max_tokens=20, stop=["so it"])
    assert text == " traveller ( for " and finish == pb.FINISH_REASON_STOP
    assert len(ids) == 5  # "so" and "it", which made the stop string, are still counted


@pytest.mark.parametrize("stop", ["(for", "For So", "him)"])
def test_a_stop_string_written_as_text_stops_the_stream(served, stop: str) -> None:
    """The stream spells " ( for so it ... him ) was": a stop written as the user writes text
    (no space before the punctuation, capitals) never matched it and ran to max_tokens."""
    server, _ = served
    text, _, finish = _generate(server, prompt="The Time", max_tokens=40, stop=[stop])
    assert finish == pb.FINISH_REASON_STOP, text
    assert " traveller" in text and "was" not in text


def test_score_counts_unknown_words_and_names_them_by_their_text(served) -> None:
    server, _ = served
    reply = server.stub.Score(pb.ScoreRequest(model="w", texts=["Zorblax said Quux, Filby"]))
    (result,) = reply.results
    assert list(result.tokens) == ["said", "quux", ",", "filby"]
    assert result.unknown_tokens == 1 and result.num_tokens == 4  # the first conditions


def test_logprobs_offsets_point_into_the_text_as_sent(served) -> None:
    """An ellipsis is three "." tokens: the search kept "…", found the next "." of the text
    instead (at "LATE,"'s end), and put every later token at the end of the text."""
    server, _ = served
    prompt = "Wait… it's LATE,\nisn't it? Yes."
    body = {"model": "w", "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 0}
    lp = _completions(server, body)["choices"][0]["logprobs"]
    assert lp["tokens"] == ["wait", ".", ".", ".", "it", "'", "s", "late", ",", "isn", "'",
                            "t", "it", "?", "yes", "."]  # fmt: skip
    assert lp["text_offset"][1:4] == [4, 4, 4]  # the three dots stand on the "…"
    spots = [
        prompt[o : o + len(t)].lower() for t, o in zip(lp["tokens"], lp["text_offset"], strict=True)
    ]
    assert spots[4:] == lp["tokens"][4:] and spots[0] == "wait"


def test_a_completion_echoed_is_the_prompt_then_each_word_after_a_space(served) -> None:
    server, _ = served
    body = {"model": "w", "prompt": "It's", "echo": True, "logprobs": 0, "max_tokens": 3,
            "temperature": 0}  # fmt: skip
    choice = _completions(server, body)["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert text.startswith("It's ") and len(lp["tokens"]) == 3 + 3
    spots = [
        text[o : o + len(t)].lower() for t, o in zip(lp["tokens"], lp["text_offset"], strict=True)
    ]
    assert spots == lp["tokens"] and lp["token_logprobs"][0] is None
