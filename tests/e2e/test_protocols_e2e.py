"""A real `rnn-server` process with --http-port: the OpenAI SDK and curl over TLS with bearer
tokens, the real tritonclient over KServe gRPC, and SIGTERM turning /v2/health/ready 503
while calls are still taken (--drain-delay), then exit 0."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the openai SDK's HTTP client
import openai
import pytest

from tests.e2e.processes import reap
from tests.e2e.test_ops_auth_tls import pki  # noqa: F401  (the certificates fixture)
from tests.integration.http.conftest import free_port
from tests.integration.http.triton import run_triton

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
TOKEN = "e2e-http-token"


def start(model_repo: Path, log: Path, *args: str) -> tuple[subprocess.Popen, int, int]:
    port, http_port = free_port(), free_port()
    cmd = [str(BIN / "rnn-server"), "--model-repo", str(model_repo), "--host", "127.0.0.1",
           "--port", str(port), "--http-port", str(http_port), "--metrics-port", "0",
           *args]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    return proc, port, http_port


def wait_ready(proc: subprocess.Popen, url: str, log: Path, **kwargs) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"rnn-server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2, **kwargs).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"not ready in 60s:\n{log.read_text()[-3000:]}")


def test_tls_tokens_openai_and_curl(model_repo: Path, tmp_path: Path, pki: dict) -> None:  # noqa: F811
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(TOKEN + "\n")
    log = tmp_path / "server.log"
    proc, _, http_port = start(
        model_repo, log, "--tokens-file", str(tokens),
        "--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"],
    )  # fmt: skip
    url = f"https://localhost:{http_port}"
    try:
        wait_ready(proc, url, log, verify=pki["ca"])
        tls = httpx.Client(verify=pki["ca"])
        client = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, http_client=tls, max_retries=0)
        # greedy: OpenAI's default temperature (1) samples, and a sampled stream may draw
        # <eos> (p ~ 1e-3 a token on the tiny model) before its 8 tokens
        done = client.completions.create(
            model="lstm", prompt="the time", max_tokens=8, temperature=0
        )
        assert done.usage.completion_tokens == 8
        streamed = client.completions.create(
            model="lstm", prompt="the time", max_tokens=8, stream=True, temperature=0
        )
        assert "".join(c.choices[0].text for c in streamed if c.choices)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=url + "/v1", api_key="bad", http_client=tls, max_retries=0
            ).models.list()
        body = json.dumps({"model": "lstm", "prompt": "a b", "max_tokens": 3, "stream": True})
        curl = subprocess.run(
            ["curl", "-sS", "-N", "--cacert", pki["ca"], "-H", f"Authorization: Bearer {TOKEN}",
             "-d", body, url + "/v1/completions"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert curl.stdout.rstrip().endswith("data: [DONE]")
        plain = subprocess.run(
            ["curl", "-sS", f"http://localhost:{http_port}/v2/health/live"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert '"live"' not in plain.stdout  # plaintext is refused on a TLS port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        reap(proc)
    access = [json.loads(line) for line in log.read_text().splitlines() if '"rpc"' in line]
    rpcs = {(a["rpc"], a["code"]) for a in access}
    assert ("openai.Completions", "OK") in rpcs and ("openai.Models", "UNAUTHENTICATED") in rpcs
    assert all(a.get("request_id") for a in access)
    assert TOKEN not in log.read_text()


def test_mutual_tls_on_the_http_port(model_repo: Path, tmp_path: Path, pki: dict) -> None:  # noqa: F811
    log = tmp_path / "server.log"
    proc, _, http_port = start(
        model_repo, log, "--tls-cert", pki["server_cert"], "--tls-key", pki["server_key"],
        "--tls-client-ca", pki["ca"],
    )  # fmt: skip
    url = f"https://localhost:{http_port}"

    def tls(prefix: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=pki["ca"])
        if prefix is not None:
            context.load_cert_chain(pki[f"{prefix}client_cert"], pki[f"{prefix}client_key"])
        return context

    try:
        wait_ready(proc, url, log, verify=tls(""))
        body = {"model": "lstm", "prompt": "ab", "max_tokens": 2}
        ok = httpx.post(url + "/v1/completions", json=body, verify=tls(""))
        assert ok.status_code == 200
        for refused in (None, "other_"):  # no certificate; one from an unrelated CA
            with pytest.raises(httpx.HTTPError):
                httpx.post(url + "/v1/completions", json=body, verify=tls(refused))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        reap(proc)


def test_sigterm_turns_http_ready_503_then_exits(model_repo: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc, port, http_port = start(model_repo, log, "--drain-delay", "3", "--grace", "2")
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(proc, url, log)
        got = run_triton("grpc", f"127.0.0.1:{port}")
        assert got["ready"] and got["score"]["num_tokens"] == [17, 5]
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 3
        while httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
            assert time.monotonic() < end
            time.sleep(0.05)
        assert httpx.get(url + "/v2/health/ready", timeout=2).status_code == 503
        assert httpx.get(url + "/v2/health/live", timeout=2).status_code == 200
        body = {"model": "lstm", "prompt": "ab", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body, timeout=10).status_code == 200
        assert proc.wait(timeout=30) == 0
    finally:
        reap(proc)
