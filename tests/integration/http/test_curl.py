"""curl (a subprocess, as a user would type it) against the HTTP port: SSE framing, JSON
errors with their HTTP status, request ids, the body limit, unknown paths."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.tools import need


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """-> (HTTP status, lower-cased headers, body)."""
    binary = need("curl", "the HTTP port is driven as a user would, with curl")
    done = subprocess.run(
        [binary, "-sS", "-N", "-i", "--max-time", "60", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


def post(url: str, body: object, *extra: str) -> tuple[int, dict[str, str], str]:
    return curl("-H", "content-type: application/json", "-d", json.dumps(body), *extra, url)


def test_sse_stream_frames_and_done(base_url: str) -> None:
    body = {"model": "lstm", "prompt": "the time", "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    status, headers, text = post(base_url + "/v1/completions", {**body, "temperature": 0})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}


def test_request_id_is_echoed(base_url: str) -> None:
    body = {"model": "lstm", "prompt": "the", "max_tokens": 2}
    status, headers, text = post(base_url + "/v1/completions", body, "-H", "x-request-id: abc-1")
    assert status == 200 and headers["x-request-id"] == "abc-1"
    assert json.loads(text)["id"] == "cmpl-abc-1"


@pytest.mark.parametrize("sent", ["caf\u00e9", "\udcff\udcfeab"])  # UTF-8; not UTF-8 bytes
def test_a_request_id_gRPC_could_not_carry_is_replaced(base_url: str, sent: str) -> None:
    """The header echoed `ab` while the body and the access line held the undecodable id."""
    body = {"model": "lstm", "prompt": "the", "max_tokens": 2}
    status, headers, text = post(base_url + "/v1/completions", body, "-H", f"x-request-id: {sent}")
    rid = headers["x-request-id"]
    assert status == 200 and rid.isascii() and rid.isprintable() and len(rid) == 16
    assert json.loads(text)["id"] == f"cmpl-{rid}"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "lstm"}, 400, "prompt"),
        ({"model": "lstm", "prompt": "a", "frequency_penalty": 1}, 400, "frequency_penalty"),
        ({"model": "lstm", "prompt": [1, 2, 3]}, 400, "prompt"),
        ({"model": "lstm", "prompt": "a", "colour": "red"}, 400, "colour"),
        ({"model": "missing", "prompt": "a"}, 404, "model"),
        ({"model": "sine-gru", "prompt": "a"}, 404, "model"),  # not in GET /v1/models
        ({"model": "lstm", "prompt": "a", "n": True}, 400, "n"),
        (
            {"model": "lstm", "prompt": "a", "stream_options": {"include_usage": True}},
            400,
            "stream_options",
        ),
    ],
)
def test_openai_errors_are_json_with_status(base_url, body, status, param) -> None:
    got, headers, text = post(base_url + "/v1/completions", body)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    error = json.loads(text)["error"]
    assert error["message"] and error["param"] == param
    assert headers["x-request-id"]


def test_openai_sampling_errors_use_the_request_names(base_url: str) -> None:
    """The engine checks top_k as `sampling.top_k`; an OpenAI client sent `top_k`."""
    got, _, text = post(base_url + "/v1/completions",
                        {"model": "lstm", "prompt": "a", "temperature": 101})  # fmt: skip
    error = json.loads(text)["error"]
    assert got == 400 and error["param"] == "temperature"
    assert (
        error["message"].startswith("temperature: must be in")
        and "sampling" not in error["message"]
    )
    # top_k over the vocabulary keeps it all (HF, vLLM): a client default of 50 on a char model
    got, _, _ = post(base_url + "/v1/completions",
                     {"model": "lstm", "prompt": "a", "top_k": 50, "max_tokens": 2})  # fmt: skip
    assert got == 200


def test_openai_max_tokens_over_the_limit_names_no_grpc_default(base_url: str) -> None:
    """The limit is the server's; the gRPC default (64, "unset") is not OpenAI's (16)."""
    got, _, text = post(base_url + "/v1/completions",
                        {"model": "lstm", "prompt": "a", "max_tokens": 10**9})  # fmt: skip
    error = json.loads(text)["error"]
    assert got == 400 and error["param"] == "max_tokens"
    assert "got 1000000000" in error["message"] and "unset" not in error["message"]


def test_not_json_and_unknown_paths(base_url: str) -> None:
    status, _, text = curl("-d", "{not json", base_url + "/v1/completions")
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    assert json.loads(text)["error"]["param"] is None  # no field is at fault: OpenAI's null
    status, _, text = curl(base_url + "/v1/nothing")
    assert status == 404 and json.loads(text)["error"]["message"]
    status, _, text = curl(base_url + "/v2/nothing")
    assert status == 404 and "error" in json.loads(text)
    status, _, _ = curl("-X", "DELETE", base_url + "/v1/completions")
    assert status == 405


@pytest.mark.parametrize("path", ["/v1/completions", "/v2/models/lstm/infer"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_its_content_encoding_does_not_decode_is_a_400(
    base_url: str, path: str, encoding: str
) -> None:
    """aiohttp decompresses the body as it is read; its error was an INTERNAL 500."""
    status, _, text = curl("-H", f"Content-Encoding: {encoding}", "--data-binary", "not it",
                           base_url + path)  # fmt: skip
    error = json.loads(text)["error"]
    message = error if path.startswith("/v2") else error["message"]
    assert (
        status == 400
        and f"could not be read: Can not decode content-encoding: {encoding}" in message
    )


def test_kserve_rest_with_curl(base_url: str) -> None:
    status, _, text = curl(base_url + "/v2/health/live")
    assert status == 200 and json.loads(text) == {"live": True}
    status, _, text = curl(base_url + "/v2/health/ready")
    assert status == 200 and json.loads(text) == {"ready": True}
    assert curl(base_url + "/v2/models/lstm/ready")[0] == 200
    assert curl(base_url + "/v2/models/lstm/versions/1/ready")[0] == 200
    assert curl(base_url + "/v2/models/missing/ready")[0] == 404
    status, _, text = curl(base_url + "/v2")
    assert status == 200 and json.loads(text)["name"] == "rnnserve"
    status, _, text = curl(base_url + "/v2/models/sine-gru/versions/1")
    meta = json.loads(text)
    assert [i["name"] for i in meta["inputs"]] == ["history", "horizon"]
    body = {
        "id": "r1",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["the time"]}],
        "outputs": [{"name": "num_tokens"}],
    }
    status, _, text = post(base_url + "/v2/models/lstm/infer", body)
    got = json.loads(text)
    assert status == 200 and got["id"] == "r1" and got["model_version"] == "1"
    assert got["outputs"] == [
        {"name": "num_tokens", "datatype": "INT64", "shape": [1], "data": [7]}
    ]


@pytest.mark.parametrize(
    ("inputs", "status", "words"),
    [
        ([{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}], 400, "BYTES"),
        ([{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a b"]}], 400, "shape"),
        ([{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]}], 400, "accepted"),
        ([{"name": "history", "datatype": "FP32", "shape": [1], "data": [1.0]}], 400, "horizon"),
        ([{"name": "text", "datatype": "WAT", "shape": [1], "data": ["a"]}], 400, "datatype"),
        # 2.5 is not an INT64: refused rather than truncated to 2
        (
            [
                {"name": "history", "datatype": "FP32", "shape": [2], "data": [0.5, 1.0]},
                {"name": "horizon", "datatype": "INT64", "shape": [1], "data": [2.5]},
            ],
            400,
            "integers",
        ),
    ],
)
def test_kserve_rest_errors(base_url, inputs, status, words) -> None:
    got, _, text = post(base_url + "/v2/models/lstm/infer", {"inputs": inputs})
    assert got == status
    assert words in json.loads(text)["error"]


def test_kserve_engine_errors_name_the_input_and_its_row(base_url: str) -> None:
    """What the Engine refuses is told as the input sent (not Score's `texts`), and a [B, T]
    history's bad value by its row and column (the Engine saw one row at a time)."""
    text = {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["the time", "a"]}
    status, _, body = post(base_url + "/v2/models/lstm/infer", {"inputs": [text]})
    assert status == 400
    assert json.loads(body)["error"].startswith("inputs[text][1]: needs at least two tokens")
    rows = [0.0, 0.5, 0.8, 1.0, 1e300, 0.5]  # finite, but far past the model: row 1, column 1
    history = {"name": "history", "datatype": "FP64", "shape": [2, 3], "data": rows}
    horizon = {"name": "horizon", "datatype": "INT64", "shape": [1], "data": [2]}
    status, _, body = post(base_url + "/v2/models/sine-gru/infer", {"inputs": [history, horizon]})
    assert status == 400
    assert json.loads(body)["error"].startswith("inputs[history][1][1]: 1e+300 is too far")


def test_kserve_rest_forecast_has_its_interval_bounds(base_url: str) -> None:
    """REST JSON returns lower / upper beside the forecast, FP32 and shaped like it."""
    history = {"name": "history", "datatype": "FP32", "shape": [1, 4], "data": [0, 0.5, 0.9, 1]}
    horizon = {"name": "horizon", "datatype": "INT64", "shape": [1], "data": [3]}
    status, _, body = post(base_url + "/v2/models/sine-gru/infer", {"inputs": [history, horizon]})
    assert status == 200
    out = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert list(out) == ["forecast", "lower", "upper"]
    assert all(o["datatype"] == "FP32" and o["shape"] == [1, 3] for o in out.values())
    lower, forecast, upper = (out[n]["data"] for n in ("lower", "forecast", "upper"))
    assert all(lo <= f <= hi for lo, f, hi in zip(lower, forecast, upper, strict=True))


def test_kserve_task_mismatch_and_unknown(base_url: str) -> None:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a b"]}]}
    status, _, text = post(base_url + "/v2/models/sine-gru/infer", body)
    assert status == 400 and "Forecast" in json.loads(text)["error"]
    status, _, _ = post(base_url + "/v2/models/missing/infer", body)
    assert status == 404
    status, _, _ = post(base_url + "/v2/models/lstm/versions/9/infer", body)
    assert status == 404
    status, _, _ = post(base_url + "/v2/models/missing/infer", {})  # the model before the body
    assert status == 404


_text_input = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a b"]}]}


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        # a number was dropped from the reply unsaid: a client matching replies by id lost it
        ({"id": 5}, "id: must be a string, got 5"),
        # two copies came back; an input given twice is refused, Triton refuses both
        (
            {"outputs": [{"name": "perplexity"}, {"name": "perplexity"}]},
            "outputs: 'perplexity' is asked twice",
        ),
    ],
)
def test_kserve_rest_refuses_a_bad_id_and_an_output_asked_twice(base_url, extra, words) -> None:
    status, _, text = post(base_url + "/v2/models/lstm/infer", _text_input | extra)
    assert status == 400 and json.loads(text)["error"] == words
    status, _, text = post(base_url + "/v2/models/lstm/infer", _text_input | {"id": None})
    assert status == 200 and "id" not in json.loads(text)  # null: as if absent


def test_kserve_rest_binary_form_and_malformed_bodies(base_url: str) -> None:
    """The binary tensor extension by hand (tritonclient covers the usual path), and bodies
    whose shape is wrong get 400s naming the part."""
    import struct
    import urllib.error
    import urllib.request

    text = b"the time"
    head = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": 4 + len(text)}}],
            "outputs": [{"name": "num_tokens", "parameters": {"binary_data": True}}]}  # fmt: skip
    header = json.dumps(head).encode()
    req = urllib.request.Request(
        base_url + "/v2/models/lstm/infer",
        data=header + struct.pack("<I", len(text)) + text,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    with urllib.request.urlopen(req, timeout=30) as reply:
        n = int(reply.headers["Inference-Header-Content-Length"])
        body = reply.read()
    got = json.loads(body[:n])
    assert got["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert struct.unpack("<q", body[n:]) == (7,)
    for bad, words in [
        ({"inputs": "x"}, "inputs"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a b"],
                      "parameters": [1]}]}, "parameters"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                      "parameters": {"binary_data_size": 99}}]}, "binary_data_size"),
        ({"inputs": [{"datatype": "BYTES", "shape": [1], "data": ["a"]}]}, "name"),
        ({**_text_input, "outputs": 5}, "outputs"),
        ({**_text_input, "parameters": {"binary_data_output": "false"}}, "binary_data_output"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [10**20],
                      "data": ["a"]}]}, "dimensions"),
        # 7 x 7905747460161236407 wraps to 1 in int64: the count is checked exactly
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [7, 7905747460161236407],
                      "data": ["a b"]}]}, "elements"),
    ]:  # fmt: skip
        status, _, text_ = post(base_url + "/v2/models/lstm/infer", bad)
        assert status == 400 and words in json.loads(text_)["error"], (bad, text_)
    # `true` is not a size of 1 byte (a Python bool is an int): named, not read as one byte
    head["inputs"][0]["parameters"]["binary_data_size"] = True
    header = json.dumps(head).encode()
    req = urllib.request.Request(
        base_url + "/v2/models/lstm/infer",
        data=header + b"\x01",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    assert "binary_data_size must be a byte count" in json.loads(err.value.read())["error"]
