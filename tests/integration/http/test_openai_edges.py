"""The HTTP port as clients misbehave or read closely: a client that leaves before its body
is read, the echoed prompt's logprob offsets, a wrong method's Allow header."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import openai
import pytest


def _errors(server, rpc: str, code: str) -> float:
    labels = {"rpc": rpc, "code": code}
    return server.app.metrics.registry.get_sample_value("rnnserve_errors_total", labels) or 0


@pytest.mark.parametrize(
    ("path", "rpc"),
    [("/v1/completions", "openai.Completions"), ("/v2/models/lstm/infer", "kserve.ModelInfer")],
)
def test_a_client_leaving_before_its_body_is_read_is_cancelled_not_internal(
    server, path: str, rpc: str
) -> None:
    """aiohttp's read raised ConnectionResetError: an INTERNAL 500, logged with a traceback
    and counted as the server's error, for a client that closed its own connection."""
    before = {code: _errors(server, rpc, code) for code in ("CANCELLED", "INTERNAL")}
    with socket.create_connection(("127.0.0.1", server.app.http.port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"model"'.encode()
        )
        # leave while the handler waits for the rest of the body
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while all(_errors(server, rpc, code) == n for code, n in before.items()):
        assert time.monotonic() < deadline, "the call was never logged"
        time.sleep(0.05)
    assert _errors(server, rpc, "INTERNAL") == before["INTERNAL"]
    assert _errors(server, rpc, "CANCELLED") == before["CANCELLED"] + 1


def test_echoed_logprobs_offsets_point_at_their_tokens(base_url: str) -> None:
    """The echoed prompt keeps its capitals and punctuation; its tokens are normalised
    (lowercase, letters only). Each text_offset must still point at its token's letter."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    prompt = "The TIME Traveller, he said"
    got = client.completions.create(
        model="lstm", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=0
    ).choices[0]
    lp = got.logprobs
    assert lp.text_offset == sorted(lp.text_offset)
    letters = [(t, o) for t, o in zip(lp.tokens, lp.text_offset, strict=True) if t.isalpha()]
    assert len(letters) == sum(c.isalpha() for c in prompt) + sum(
        c.isalpha() for c in got.text[len(prompt) :]
    )
    assert all(got.text[o].lower() == t for t, o in letters), letters


def test_a_wrong_method_says_which_are_allowed(base_url: str) -> None:
    """RFC 9110: a 405 carries Allow; the JSON body replaced aiohttp's response without it."""
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base_url + "/v1/completions", timeout=30)  # a GET
    assert err.value.code == 405 and err.value.headers["Allow"] == "POST"
    assert err.value.headers["Content-Type"].startswith("application/json")
