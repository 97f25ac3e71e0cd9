"""The auxiliary endpoints users of vLLM and Triton call beside inference, on a real server:
vLLM's /health, /version, /tokenize, /detokenize; Triton's model configuration, repository
index and (refused) model control, also through the real tritonclient. Each goes through
the HTTP port's guards, access log and metrics (the health probe through its probe path)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from rnnserve.artifact.manifest import Manifest
from rnnserve.artifact.tokenizer import Tokenizer
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.http.conftest import TOKEN, free_port, http_server
from tests.integration.http.test_ops import GuardedServer
from tests.integration.http.triton import SCRIPT, triton_python
from tests.integration.server.harness import ServerThread, make_settings

NO_CONTROL = "explicit model load / unload is not allowed"


def call(
    url: str, body: object | None = None, token: str = "", method: str = ""
) -> tuple[int, object, bytes]:
    """-> (status, parsed JSON body or None, raw body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    return status, (json.loads(raw) if raw else None), raw


def _ids(model_repo: Path, model: str, text: str) -> list[int]:
    """The ids of `text` by the package's own manifest, independent of the server."""
    manifest = Manifest.load(model_repo / model / "1")
    return manifest.build_vocab().encode(Tokenizer(manifest.tokenizer).tokenize(text))


# -- vLLM ---------------------------------------------------------------------------------
def test_health_is_an_empty_200_and_version_is_the_servers(base_url: str) -> None:
    """vLLM's /health: 200, no body (its probes read the status only); /version: the
    release, as GET /v2 tells it."""
    status, _, raw = call(base_url + "/health")
    assert (status, raw) == (200, b"")
    status, got, _ = call(base_url + "/version")
    assert status == 200 and got == {"version": metadata.version("rnnserve")}
    assert got["version"] == call(base_url + "/v2")[1]["version"]


def test_tokenize_gives_the_ids_completions_feed(server, base_url: str, model_repo) -> None:
    """The ids are the manifest tokenizer's and vocabulary's, and as many as completions
    count in usage.prompt_tokens; max_model_len is --max-prompt-tokens."""
    text = "The Time Traveller, \u00e9!"
    status, got, _ = call(base_url + "/tokenize", {"model": "lstm", "prompt": text})
    assert status == 200
    expected = _ids(model_repo, "lstm", text)
    assert got == {
        "count": len(expected),
        "max_model_len": server.settings.max_prompt_tokens,
        "tokens": expected,
        "token_strs": None,
    }
    done = call(base_url + "/v1/completions", {"model": "lstm", "prompt": text, "max_tokens": 1})
    assert done[1]["usage"]["prompt_tokens"] == got["count"]
    body = {"model": "lstm", "prompt": "ab", "return_token_strs": True}
    assert call(base_url + "/tokenize", body)[1]["token_strs"] == ["a", "b"]
    # nothing to add: no BOS / EOS in these tokenizers, so both values tokenize the same
    for special in (True, False):
        body = {"model": "lstm", "prompt": text, "add_special_tokens": special}
        assert call(base_url + "/tokenize", body)[1]["tokens"] == expected
    empty = call(base_url + "/tokenize", {"model": "lstm", "prompt": ""})
    assert empty[:2] == (200, {**got, "count": 0, "tokens": []})


def test_detokenize_spells_what_generate_streams(server, base_url: str) -> None:
    """The ids of a greedy Generate detokenize to its text; a prompt's ids to the prompt as
    the tokenizer normalised it; reserved ids (<unk> <pad> <bos> <eos>) to nothing."""
    request = pb.GenerateRequest(model="lstm", prompt="the time", max_tokens=12)
    replies = list(server.stub.Generate(request, timeout=30))
    ids = [t for r in replies for t in r.token_ids]
    status, got, _ = call(base_url + "/detokenize", {"model": "lstm", "tokens": ids})
    assert status == 200 and got == {"prompt": "".join(r.text for r in replies)}
    tokens = call(base_url + "/tokenize", {"model": "lstm", "prompt": "The  Time"})[1]["tokens"]
    back = call(base_url + "/detokenize", {"model": "lstm", "tokens": tokens})[1]
    assert back == {"prompt": "the time"}
    reserved = call(base_url + "/detokenize", {"model": "lstm", "tokens": [0, 1, 2, 3, *tokens]})
    assert reserved[1] == {"prompt": "the time"}
    assert call(base_url + "/detokenize", {"model": "lstm", "tokens": []})[1] == {"prompt": ""}
    s = server.settings  # a prompt and its completion at most, as vLLM's max_model_len
    most = s.max_prompt_tokens + s.max_tokens
    status, got, _ = call(base_url + "/detokenize", {"model": "lstm", "tokens": [4] * (most + 1)})
    assert status == 400 and got["error"]["param"] == "tokens"
    assert f"more than the {most}" in got["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "words"),
    [
        ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model", "not in the repository"),
        ("/tokenize", {"model": "sine-gru", "prompt": "a"}, 404, "model", "Forecast"),
        ("/tokenize", {"model": "bilstm", "prompt": "a"}, 404, "model", "Infill"),
        ("/detokenize", {"model": "nope", "tokens": [5]}, 404, "model", "not in the repository"),
        ("/tokenize", {"prompt": "a"}, 400, "model", "is required"),
        ("/tokenize", {"model": "lstm"}, 400, "prompt", "is required"),
        ("/tokenize", {"model": "lstm", "prompt": ["a"]}, 400, "prompt", "a string"),
        ("/tokenize", {"model": "lstm", "prompt": "a" * 5000}, 400, "prompt", "limit of 4096"),
        ("/tokenize", {"model": "lstm", "prompt": "a", "add_special_tokens": "no"}, 400,
         "add_special_tokens", "true or false"),
        ("/tokenize", {"model": "lstm", "prompt": "a", "truncate": 3}, 400, "truncate",
         "not a tokenize field"),
        ("/tokenize", {"model": "lstm", "messages": [{"role": "user", "content": "a"}]}, 400,
         "messages", "chat template"),
        ("/tokenize", {"model": "nope", "messages": []}, 404, "model", "not in the repository"),
        ("/detokenize", {"model": "lstm", "tokens": [5, 99999]}, 400, "tokens",
         "tokens[1]: 99999 is not a token id of model lstm/1"),
        ("/detokenize", {"model": "lstm", "tokens": [-1]}, 400, "tokens", "tokens[0]: -1"),
        ("/detokenize", {"model": "lstm", "tokens": [True]}, 400, "tokens", "tokens[0]: True"),
        ("/detokenize", {"model": "lstm", "tokens": [4.0]}, 400, "tokens", "tokens[0]: 4.0"),
        ("/detokenize", {"model": "lstm", "tokens": "abc"}, 400, "tokens", "list of token ids"),
        ("/detokenize", [4, 5], 400, None, "JSON object"),
    ],
)  # fmt: skip
def test_tokenizer_endpoints_refuse_with_openais_error_object(
    base_url: str, path: str, body: object, status: int, param: str | None, words: str
) -> None:
    """An unknown model, or one /v1/models leaves out, is the 404 model_not_found of
    completions; ids out of the vocabulary and malformed fields are 400s naming the field."""
    got_status, got, _ = call(base_url + path, body)
    assert got_status == status, got
    error = got["error"]
    assert error["param"] == param and words in error["message"], error
    if status == 404:
        assert error["code"] == "model_not_found"


# -- Triton ---------------------------------------------------------------------------------
def _data(name: str, dims: list[int]) -> tuple[list[int], list]:
    """A value for one configured input: its shape (-1 filled in) and its data."""
    values = {
        "text": ["the time", "it was", "ab"],
        "left": ["the ti"],
        "right": ["e machine"],
        "top_k": [3],
        "history": [0.0, 0.5, 0.8, 1.0, 0.8, 0.5, 0.0],
        "horizon": [3],
    }[name]
    shape = [len(values) if d == -1 else d for d in dims]
    return shape, values


@pytest.mark.parametrize(
    ("model", "uses"),
    [
        ("lstm", [["text"], ["left", "right", "top_k"]]),
        ("bilstm", [["left", "right", "top_k"], ["left", "right"]]),
        ("sine-gru", [["history", "horizon"]]),
        ("sine-mlp", [["history", "horizon"]]),
    ],
)
def test_model_config_describes_what_infer_takes(
    base_url: str, model: str, uses: list[list[str]]
) -> None:
    """Triton's configuration: ONNX Runtime's platform and backend, no batch dimension
    (max_batch_size 0), and inputs whose names, TYPE_ data types and dims, used as they
    stand, make infer requests the server answers, with the outputs the config lists."""
    status, config, _ = call(base_url + f"/v2/models/{model}/config")
    assert status == 200
    assert config["name"] == model and config["max_batch_size"] == 0
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert config["parameters"]["version"] == {"string_value": "1"}
    inputs = {i["name"]: i for i in config["input"]}
    outputs = {o["name"] for o in config["output"]}
    meta = call(base_url + f"/v2/models/{model}")[1]
    for t in meta["inputs"]:  # metadata's tensors are among the config's, in Triton's types
        wanted = "TYPE_STRING" if t["datatype"] == "BYTES" else f"TYPE_{t['datatype']}"
        assert inputs[t["name"]]["data_type"] == wanted and inputs[t["name"]]["dims"] == t["shape"]
    required = {n for n, i in inputs.items() if not i["optional"]}
    for names in uses:
        assert required <= set(names)
        sent = []
        for name in names:
            spec = inputs[name]
            shape, data = _data(name, spec["dims"])
            datatype = spec["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES")
            sent.append({"name": name, "datatype": datatype, "shape": shape, "data": data})
        status, got, _ = call(base_url + f"/v2/models/{model}/infer", {"inputs": sent})
        assert status == 200, got
        assert {o["name"] for o in got["outputs"]} <= outputs
        if "history" in names:  # lower / upper listed exactly when the forecaster returns them
            assert {o["name"] for o in got["outputs"]} == outputs


def test_model_config_finds_the_model_as_metadata_does(base_url: str) -> None:
    assert call(base_url + "/v2/models/lstm/versions/1/config")[0] == 200
    for path, words in [("/v2/models/nope/config", "model 'nope' is not in the repository"),
                        ("/v2/models/lstm/versions/9/config", "has no version '9'")]:  # fmt: skip
        status, got, _ = call(base_url + path)
        assert status == 404 and words in got["error"], got


def test_repository_index_lists_every_version(server, base_url: str) -> None:
    status, got, _ = call(base_url + "/v2/repository/index", method="POST")
    names = sorted(server.app.engine.repository.names())
    assert status == 200
    assert got == [{"name": n, "version": "1", "state": "READY", "reason": ""} for n in names]
    assert call(base_url + "/v2/repository/index", {"ready": True})[1] == got
    for body, param in [({"ready": "yes"}, "ready: must be true or false"),
                        ({"repository_name": ""}, "repository_name: is not an index"),
                        ([1], "request: the body must be empty or an object")]:  # fmt: skip
        status, got, _ = call(base_url + "/v2/repository/index", body)
        assert status == 400 and got == {"error": got["error"]} and param in got["error"]


@pytest.mark.parametrize("action", ["load", "unload"])
def test_model_control_is_refused_as_triton_refuses_it(server, base_url, action, caplog) -> None:
    """Triton's answer without explicit model control: 503 and its words, with how models
    change here. Counted FAILED_PRECONDITION: a client's call must not fire the server-side
    error-rate alert, which counts UNAVAILABLE."""
    registry = server.app.metrics.registry
    rpc = "kserve.RepositoryModelLoad" if action == "load" else "kserve.RepositoryModelUnload"

    def count(code: str) -> float:
        labels = {"rpc": rpc, "model": "lstm", "code": code}
        return registry.get_sample_value("rnnserve_request_duration_seconds_count", labels) or 0

    before = count("FAILED_PRECONDITION")
    with caplog.at_level(logging.INFO, logger="rnnserve.server.access"):
        status, got, _ = call(base_url + f"/v2/repository/models/lstm/{action}", {})
        deadline = time.monotonic() + 5
        while not [r for r in caplog.records if getattr(r, "rpc", "") == rpc]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert status == 503 and got["error"].startswith(NO_CONTROL)
    assert f"cannot {action} 'lstm'" in got["error"] and "rnn-client reload" in got["error"]
    assert count("FAILED_PRECONDITION") == before + 1 and count("UNAVAILABLE") == 0
    (line,) = [r for r in caplog.records if getattr(r, "rpc", "") == rpc]
    assert line.code == "FAILED_PRECONDITION" and line.model == "lstm"


def test_tritonclient_reads_config_and_index(server, base_url: str) -> None:
    """The real tritonclient.http (its own venv): get_model_config parses the config, an
    infer built from it alone is answered, the index lists every version, and load / unload
    raise Triton's refusal."""
    port = server.app.http.port
    code = (
        f"import json, sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import triton_calls; "
        f"print(json.dumps(triton_calls.aux_endpoints('127.0.0.1:{port}')))"
    )
    done = subprocess.run(
        [triton_python(), "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for model, config in got["config"].items():
        assert config == call(base_url + f"/v2/models/{model}/config")[1]
    assert got["config_v1"] == got["config"]["lstm"]
    assert {o["name"] for o in got["config"]["sine-gru"]["output"]} == set(got["forecast_outputs"])
    assert got["index"] == call(base_url + "/v2/repository/index", method="POST")[1]
    for action in ("load", "unload"):
        assert got[action][0] == "503" and got[action][1].startswith(NO_CONTROL)
    assert got["config_unknown"][0] == "404"


# -- readiness, tokens, metrics --------------------------------------------------------------
@pytest.fixture(scope="module")
def unready(model_repo: Path, tmp_path_factory) -> Iterator[ServerThread]:
    """A server whose one model version failed to load: nothing serves, so it is not ready."""
    repo = tmp_path_factory.mktemp("broken")
    shutil.copytree(model_repo / "lstm" / "1", repo / "lstm" / "1")
    (repo / "lstm" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    srv = http_server(repo)
    yield srv
    srv.stop()


def test_health_is_503_while_nothing_serves(unready: ServerThread) -> None:
    base = f"http://127.0.0.1:{unready.app.http.port}"
    status, _, raw = call(base + "/health")
    assert (status, raw) == (503, b"")
    assert call(base + "/v2/health/ready")[:2] == (503, {"ready": False})  # the same readiness


def test_index_tells_why_a_version_is_unavailable(unready: ServerThread) -> None:
    base = f"http://127.0.0.1:{unready.app.http.port}"
    status, (entry,), _ = call(base + "/v2/repository/index", method="POST")
    assert status == 200 and (entry["name"], entry["version"]) == ("lstm", "1")
    assert entry["state"] == "UNAVAILABLE" and entry["reason"]
    assert call(base + "/v2/repository/index", {"ready": True})[1] == []
    status, got, _ = call(base + "/v2/models/lstm/config")
    assert status == 404 and "has no available versions" in got["error"]
    status, got, _ = call(base + "/v2/models/lstm/versions/1/config")
    assert status == 503 and "not at ready state" in got["error"]


@pytest.fixture(scope="module")
def guarded(model_repo: Path) -> Iterator[GuardedServer]:
    """Bearer tokens, without --auth-health."""
    srv = GuardedServer(make_settings(model_repo, http_port=free_port())).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/version", None),
        ("/tokenize", {"model": "lstm", "prompt": "a"}),
        ("/detokenize", {"model": "lstm", "tokens": [5]}),
        ("/v2/models/lstm/config", None),
        ("/v2/repository/index", {}),
        ("/v2/repository/models/lstm/load", {}),
    ],
)
def test_bearer_tokens_guard_each_endpoint_but_the_probe(
    guarded: GuardedServer, path: str, body: object
) -> None:
    base = f"http://127.0.0.1:{guarded.app.http.port}"
    status, got, _ = call(base + path, body)
    assert status == 401, got
    assert call(base + path, body, token=TOKEN)[0] in (200, 503)
    assert call(base + "/health")[0] == 200  # open like /v2/health/ready without --auth-health


def test_each_call_is_logged_and_counted_under_its_rpc(server, base_url: str, caplog) -> None:
    registry = server.app.metrics.registry

    def count(rpc: str, code: str, model: str) -> float:
        labels = {"rpc": rpc, "model": model, "code": code}
        return registry.get_sample_value("rnnserve_request_duration_seconds_count", labels) or 0

    calls = [
        ("vllm.Version", "OK", "", "/version", None),
        ("vllm.Tokenize", "OK", "lstm", "/tokenize", {"model": "lstm", "prompt": "a"}),
        ("vllm.Tokenize", "NOT_FOUND", "unknown", "/tokenize", {"model": "x", "prompt": "a"}),
        ("vllm.Detokenize", "INVALID_ARGUMENT", "lstm", "/detokenize",
         {"model": "lstm", "tokens": [-1]}),
        ("kserve.ModelConfig", "OK", "lstm", "/v2/models/lstm/config", None),
        ("kserve.RepositoryIndex", "OK", "", "/v2/repository/index", {}),
    ]  # fmt: skip
    before = [count(rpc, code, model) for rpc, code, model, _, _ in calls]
    probes = count("vllm.Health", "OK", "")
    with caplog.at_level(logging.INFO, logger="rnnserve.server.access"):
        for _, _, _, path, body in calls:
            call(base_url + path, body)
        call(base_url + "/health")
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if hasattr(r, "rpc")]) < len(calls):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    after = [count(rpc, code, model) for rpc, code, model, _, _ in calls]
    assert after == [b + 1 for b in before]
    lines = [(r.rpc, r.code) for r in caplog.records if hasattr(r, "rpc")]
    assert lines == [(rpc, code) for rpc, code, _, _, _ in calls]  # not the probe
    assert count("vllm.Health", "OK", "") == probes == 0
