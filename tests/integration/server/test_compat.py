"""Compatibility across rnnserve versions: packages and resume tokens made by older versions,
served by today's server.

Real parts: a real in-process rnn-server over copies of the tiny zoo whose manifests are
rewritten into the shapes older trainers wrote (read from their artifact/manifest.py and
export code: the first server's trainer wrote no precision, quantization, start_log_probs
or series.representation; before manifests were strict JSON a non-finite number was `NaN`)
or that a hand-written package may hold (null for an optional field). Every RPC of every
version is called. Resume tokens in the first format (version 1: no key id, no progress) and
checkpoints made before `iat` existed are re-made from real tokens, the way those servers
laid them out, and must continue the stream exactly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from rnnserve.artifact.manifest import Manifest, ManifestError
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings
from tests.integration.server.test_generate import _generate, _ids

KEY = b"k"
PROMPT = "the time traveller "
HISTORY = [math.sin(i / 3) for i in range(60)]


def _first_server_shape(data: dict) -> None:
    """As the trainer of the first server (67b2805) wrote a package."""
    for key in ("precision", "quantization", "start_log_probs"):
        data.pop(key, None)
    if data.get("series"):
        data["series"].pop("representation", None)


def _no_intervals(data: dict) -> None:
    _first_server_shape(data)
    data["series"].pop("intervals", None)


def _nulls(data: dict) -> None:
    """Optional fields as null, the metrics of a diverged run as `NaN` (non-strict JSON)."""
    for key in ("onnx_sha256", "precision", "quantization", "parity", "training"):
        data[key] = None
    data["metrics"] = {**data["metrics"], "diverged": math.nan, "unknown": None}
    for state in data["state"]:
        state["init"] = None


def _null_start(data: dict) -> None:
    """A <pad> of probability 0: save writes its log (-inf) as null."""
    data["start_log_probs"][1] = None


def _nan_init(data: dict) -> None:
    data["state"][0]["init"] = math.nan


def _nan_start(data: dict) -> None:
    data["start_log_probs"][5] = math.nan


# folder -> (zoo model, rewrite of its manifest)
PACKAGES: dict[str, tuple[str, Callable[[dict], None] | None]] = {
    "gru": ("gru", None),
    "ngram": ("ngram", None),
    "first-lstm": ("lstm", _first_server_shape),
    "first-ngram": ("ngram", _first_server_shape),
    "first-hmm": ("hmm", _first_server_shape),
    "first-bilstm": ("bilstm", _first_server_shape),
    "first-sine-gru": ("sine-gru", _first_server_shape),
    "no-intervals-sine-mlp": ("sine-mlp", _no_intervals),
    "nulls-gru": ("gru", _nulls),
    "null-start-ngram": ("ngram", _null_start),
    "nan-init-gru": ("gru", _nan_init),
    "nan-start-ngram": ("ngram", _nan_start),
}
REFUSED = {"nan-init-gru": "init must be finite", "nan-start-ngram": "no NaN or +inf"}


@pytest.fixture(scope="module")
def old_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("old-packages")
    for folder, (model, rewrite) in PACKAGES.items():
        target = root / folder / "1"
        shutil.copytree(model_repo / model / "1", target)
        if rewrite is not None:
            path = target / "manifest.json"
            data = json.loads(path.read_text())
            rewrite(data)
            path.write_text(json.dumps(data))  # NaN written as older trainers wrote it
    return root


@pytest.fixture(scope="module")
def server(old_repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_settings(old_repo, state_key=KEY.decode())).start()
    yield srv
    srv.stop()


def _status(server: ServerThread, name: str) -> pb.VersionInfo:
    return server.stub.GetModel(pb.GetModelRequest(model=name), timeout=30).versions[0]


# -- packages ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in PACKAGES if n not in REFUSED])
def test_packages_in_older_shapes_serve_every_rpc(server, name) -> None:
    info = _status(server, name)
    assert info.status == "SERVING", info.status_reason
    assert info.precision == "fp32"  # manifests before precisions existed
    stub = server.stub
    if "Generate" in info.rpcs:
        msgs = _generate(stub, model=name, prompt=PROMPT, max_tokens=20, return_state=True)
        assert len(_ids(msgs)) == 20 and msgs[0].model_version == "1" and msgs[-1].state
    if "Score" in info.rpcs:
        (result,) = stub.Score(pb.ScoreRequest(model=name, texts=[PROMPT]), timeout=30).results
        assert math.isfinite(result.perplexity) and result.num_tokens == len(PROMPT) - 1
    if "Infill" in info.rpcs:
        for left, right in [("the ti", "e machine"), ("", "he time")]:
            request = pb.InfillRequest(model=name, left=left, right=right)
            candidates = stub.Infill(request, timeout=30).candidates
            assert len(candidates) == 5
            assert all(0.0 < c.probability <= 1.0 for c in candidates)
    if "Forecast" in info.rpcs:
        request = pb.ForecastRequest(model=name, history=HISTORY, horizon=5, return_fitted=True)
        reply = stub.Forecast(request, timeout=30)
        assert len(reply.forecast) == 5 and all(math.isfinite(v) for v in reply.forecast)
        assert len(reply.lower) == (0 if name.startswith("no-intervals") else 5)


def test_null_optional_fields_read_as_left_out(server) -> None:
    """A null onnx_sha256 was the digest "None" (NOT_SERVING: "does not match the manifest's
    None"); a null state init was NaN (every Score NaN and every token <unk>, SERVING)."""
    info = _status(server, "nulls-gru")
    assert info.status == "SERVING", info.status_reason
    assert info.metrics["diverged"] != info.metrics["diverged"]  # NaN, passed on as it is
    assert "unknown" not in info.metrics
    texts = [PROMPT, "he was"]
    want = server.stub.Score(pb.ScoreRequest(model="gru", texts=texts), timeout=30).results
    got = server.stub.Score(pb.ScoreRequest(model="nulls-gru", texts=texts), timeout=30).results
    assert [r.log_likelihood for r in got] == pytest.approx([r.log_likelihood for r in want])
    kw = dict(prompt=PROMPT, max_tokens=30)
    assert _ids(_generate(server.stub, model="nulls-gru", **kw)) == _ids(
        _generate(server.stub, model="gru", **kw)
    )


def test_a_start_distribution_with_a_zero_probability_token_loads(server) -> None:
    """save() writes a log-probability of -inf as null; load refused its own output."""
    info = _status(server, "null-start-ngram")
    assert info.status == "SERVING", info.status_reason
    request = dict(left="", right="he time", top_k=8)
    want = server.stub.Infill(pb.InfillRequest(model="ngram", **request), timeout=30)
    got = server.stub.Infill(pb.InfillRequest(model="null-start-ngram", **request), timeout=30)
    assert [c.token_id for c in got.candidates] == [c.token_id for c in want.candidates]
    assert [c.probability for c in got.candidates] == pytest.approx(
        [c.probability for c in want.candidates]
    )


def test_start_distribution_round_trips_through_save(model_repo: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(model_repo / "ngram" / "1")
    assert manifest.start_log_probs is not None
    manifest.start_log_probs[1] = -math.inf
    manifest.save(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["start_log_probs"][1] is None
    assert Manifest.load(tmp_path).start_log_probs == manifest.start_log_probs
    manifest.start_log_probs = [-math.inf] * len(manifest.start_log_probs)
    with pytest.raises(ManifestError, match="every token probability 0"):
        Manifest.from_dict(manifest.to_dict())


@pytest.mark.parametrize("name", REFUSED)
def test_non_finite_state_or_start_values_are_refused_at_load(server, name) -> None:
    """A NaN init (or start log-probability) in JSON written before manifests were strict
    served NaN scores and probabilities; it is NOT_SERVING with the reason instead."""
    info = _status(server, name)
    assert info.status == "NOT_SERVING" and REFUSED[name] in info.status_reason


# -- resume tokens ------------------------------------------------------------------------------
def _resign(token: bytes, version: int, drop: tuple[str, ...]) -> bytes:
    """`token` laid out as an older server made it: token `version`, without header `drop`."""
    length = struct.unpack_from(">I", token, 3)[0]
    header = json.loads(token[7 : 7 + length])
    payload = token[7 + length : -32]
    for key in drop:
        del header[key]
    head = json.dumps(header, separators=(",", ":")).encode()
    body = struct.pack(">2sBI", b"RS", version, len(head)) + head + payload
    return body + hmac.new(KEY, body, hashlib.sha256).digest()


def test_a_first_format_token_continues_the_stream_exactly(server) -> None:
    """Version 1 (the first server's): model, version, last_token and tensors, no key id."""
    kw = dict(model="ngram", prompt="he was")
    whole = _generate(server.stub, **kw, max_tokens=30)
    head = _generate(server.stub, **kw, max_tokens=12, return_state=True)
    token = _resign(head[-1].state, 1, drop=("kid", "iat"))
    rest = _generate(server.stub, model="ngram", state=token, max_tokens=18)
    assert _ids(head) + _ids(rest) == _ids(whole)
    assert "".join(m.text for m in head + rest) == "".join(m.text for m in whole)


def test_a_checkpoint_made_before_iat_continues_the_stream_exactly(server) -> None:
    kw = dict(model="gru", max_tokens=300, state_every=100,
              sampling=pb.SamplingParams(temperature=0.9, seed=5))  # fmt: skip
    for _ in range(20):  # a slow reader gets its checkpoints merged into the last message
        ref = _generate(server.stub, prompt=PROMPT, **kw)
        marks = [i for i, m in enumerate(ref) if m.state and not m.finish_reason]
        if marks:
            break
    assert marks
    token = _resign(ref[marks[0]].state, 2, drop=("iat",))
    rest = _generate(server.stub, state=token, **kw)
    assert _ids(rest) == _ids(ref[marks[0] + 1 :])


def test_a_token_from_a_newer_format_is_refused_saying_so(server) -> None:
    head = _generate(server.stub, model="ngram", prompt="he was", max_tokens=3, return_state=True)
    token = _resign(head[-1].state, 3, drop=())
    with pytest.raises(grpc.RpcError) as err:
        _generate(server.stub, model="ngram", state=token, max_tokens=3)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "made by a newer rnn-server" in err.value.details()
