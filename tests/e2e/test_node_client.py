"""Any language works: the Node.js example (client/examples/node) streams Generate and calls
Score against a real rnn-server, loading the committed .proto with @grpc/proto-loader.

`npm install` runs into client/examples/node/node_modules (git-ignored, reused next time).
Skipped, with the reason, only where node or npm is not installed.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_client_cli import CALL_TIMEOUT_S, ServerProcess, running_server
from tests.tools import need

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "client" / "examples" / "node"
NPM_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def node() -> str:
    why = "the Node.js client example cannot run here"
    node, npm = need("node", why), need("npm", why)
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )
        assert done.returncode == 0, f"npm install failed:\n{done.stderr[-3000:]}"
    return node


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(model_repo, tmp_path_factory.mktemp("node")) as srv:
        yield srv


def run_example(node: str, server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [node, str(EXAMPLE / "client.js"), "--address", server.address, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)


def test_node_streams_generate_and_scores(node, server) -> None:
    texts = ["the time traveller", "hello"]
    # long enough to span several messages: a lone stream's tokens share a message for up
    # to --stream-interval-us, so a few tokens of a tiny model arrive as one
    args = ["--model", "lstm", "--prompt", "the time", "--max-tokens", "400"]
    done = run_example(node, server, *args, "--score", texts[0], "--score", texts[1])
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    tokens = [e for e in lines if e["event"] == "token"]
    scores = [e for e in lines if e["event"] == "score"]
    assert len(tokens) >= 2
    assert tokens[-1]["finish_reason"] != "FINISH_REASON_UNSPECIFIED"
    assert [s["text"] for s in scores] == texts
    assert all(s["perplexity"] >= 1 and s["num_tokens"] == len(s["text"]) - 1 for s in scores)


def test_node_reports_grpc_errors(node, server) -> None:
    done = run_example(node, server, "--model", "no-such-model")
    assert done.returncode == 5  # NOT_FOUND, as rnn-client
    error = json.loads(done.stderr.splitlines()[-1])
    assert error["code"] == "NOT_FOUND"


@pytest.mark.parametrize(
    "args", [["--bogus"], ["--timeout", "abc"], ["--max-tokens", "5.5"], ["--model"]]
)
def test_node_bad_flags_exit_64_with_one_line(node, args) -> None:
    """A bad flag ended in a stack trace and exit 1 (CANCELLED's number); `--timeout abc`
    became a NaN deadline (DEADLINE_EXCEEDED, exit 4) and `--max-tokens 5.5` was sent as 5."""
    cmd = [node, str(EXAMPLE / "client.js"), "--address", "127.0.0.1:1", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
    assert done.returncode == 64, done.stderr
    [line] = done.stderr.splitlines()
    assert json.loads(line)["code"] == "USAGE"
    assert done.stdout == ""


def test_node_token_file_authenticates(
    node, model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--token-file keeps the token out of process listings (as rnn-client's): its first
    line, stripped, is the bearer token; a wrong one is UNAUTHENTICATED (exit 16); an empty or
    unreadable file, or both flags, is a usage error."""
    monkeypatch.setenv("RNNSERVE_TOKENS", "s3cret")
    monkeypatch.delenv("RNNSERVE_TOKEN", raising=False)
    good, wrong, empty = tmp_path / "good", tmp_path / "wrong", tmp_path / "empty"
    good.write_text("\ufeffs3cret\r\nnot this line\n")
    wrong.write_text("guess\n")
    empty.write_text("\n")
    call = ["--model", "lstm", "--max-tokens", "3"]
    with running_server(model_repo, tmp_path) as server:
        done = run_example(node, server, *call, "--token-file", str(good))
        assert done.returncode == 0, done.stderr
        assert any(json.loads(x)["event"] == "token" for x in done.stdout.splitlines())
        done = run_example(node, server, *call, "--token-file", str(wrong))
        assert done.returncode == 16, done.stderr  # UNAUTHENTICATED
        for bad in (["--token-file", str(empty)], ["--token-file", str(tmp_path / "none")],
                    ["--token", "s3cret", "--token-file", str(good)]):  # fmt: skip
            done = run_example(node, server, *call, *bad)
            assert done.returncode == 64, done.stderr
            assert json.loads(done.stderr.splitlines()[-1])["code"] == "USAGE"
            assert "s3cret" not in done.stderr
