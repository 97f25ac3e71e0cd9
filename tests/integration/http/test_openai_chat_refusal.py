"""POST /v1/chat/completions, the call OpenAI-client users try first, is refused as vLLM
refuses chat for a base model without a chat template: a 400 invalid_request_error that says
why and points to /v1/completions, for a model served here; the 404 model_not_found of
completions for a model that is not; through the same guards, logs and metrics as the other
/v1 calls (it was a bare 404 from the unknown-path handler, under no token check)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.integration.http.conftest import TOKEN, free_port
from tests.integration.http.test_ops import GuardedServer
from tests.integration.server.harness import make_settings

MESSAGES = [{"role": "user", "content": "the time"}]


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def _post(url: str, raw: bytes, token: str = "") -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, raw, {"content-type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


@pytest.mark.parametrize("stream", [False, True])
def test_chat_on_a_served_model_is_a_400_that_points_to_completions(
    client: openai.OpenAI, stream: bool
) -> None:
    """It was a 404 (openai.NotFoundError), which reads as a wrong base URL or model name."""
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="lstm", messages=MESSAGES, stream=stream)
    body = err.value.body
    assert err.value.status_code == 400 and body["type"] == "invalid_request_error"
    assert body["param"] == "model" and body["code"] == "invalid_argument"
    message = body["message"]
    assert "'lstm'" in message and "char-level" in message and "chat template" in message
    assert "POST /v1/completions" in message and "`prompt`" in message


def test_chat_on_an_unknown_or_non_generating_model_is_model_not_found(
    client: openai.OpenAI,
) -> None:
    """As /v1/completions answers: the model is looked up first."""
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="sine-gru", messages=MESSAGES)  # a forecaster
    assert err.value.body["code"] == "model_not_found"


def test_chat_bodies_without_a_model_are_400s_naming_it(base_url: str) -> None:
    url = f"{base_url}/v1/chat/completions"
    status, headers, body = _post(url, b'{"messages": []}')
    assert status == 400 and body["error"]["param"] == "model"
    assert headers["Content-Type"].startswith("application/json")
    status, _, body = _post(url, b"not json")
    assert status == 400 and body["error"]["param"] is None
    assert body["error"]["type"] == "invalid_request_error"


def test_chat_is_counted_and_logged_like_the_other_v1_calls(base_url: str, server) -> None:
    """Counted under rpc openai.Completions (the call it should have been), with its code;
    the unknown-path handler answered it without logging or counting it."""
    registry = server.app.metrics.registry
    labels = {"rpc": "openai.Completions", "model": "lstm", "code": "INVALID_ARGUMENT"}

    def count() -> float:
        name = "rnnserve_request_duration_seconds_count"
        return registry.get_sample_value(name, labels) or 0

    before = count()
    status, headers, _ = _post(f"{base_url}/v1/chat/completions", b'{"model": "lstm"}')
    assert status == 400 and headers.get("x-request-id")
    deadline = time.monotonic() + 5
    while count() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count() == before + 1


@pytest.fixture(scope="module")
def guarded(model_repo: Path) -> Iterator[GuardedServer]:
    srv = GuardedServer(make_settings(model_repo, http_port=free_port())).start()
    yield srv
    srv.stop()


def test_chat_needs_the_bearer_token_like_completions(guarded: GuardedServer) -> None:
    """It was a 404 to anyone; now the token is checked before the model is looked up."""
    url = f"http://127.0.0.1:{guarded.app.http.port}/v1/chat/completions"
    status, headers, body = _post(url, b'{"model": "lstm"}')
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert "Bearer" in headers["WWW-Authenticate"]
    status, _, body = _post(url, b'{"model": "lstm"}', token=TOKEN)
    assert status == 400 and "/v1/completions" in body["error"]["message"]


def test_unknown_v1_paths_stay_openai_shaped_404s(base_url: str) -> None:
    """The other paths a client may try (embeddings, responses) are OpenAI-shaped 404s."""
    for path in ("/v1/embeddings", "/v1/responses", "/v1/no/such/path"):
        status, _, body = _post(f"{base_url}{path}", b"{}")
        assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"
