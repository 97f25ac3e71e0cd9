"""An in-process rnn-server (server.main.build_app) on an ephemeral port, in its own thread.

The sync client blocks, so the server's event loop runs in a background thread; a guard
lets tests require a bearer token and inject UNAVAILABLE answers through the real
interceptor.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TOKEN = "integration-token"


@dataclass
class GuardScript:
    """Calls to answer UNAVAILABLE (by RPC name), and whether a bearer token is required."""

    unavailable: dict[str, int] = field(default_factory=dict)
    require_token: bool = False
    seen: list[tuple[str, str]] = field(default_factory=list)  # (rpc, authorization)


@dataclass
class LiveServer:
    address: str
    script: GuardScript


@pytest.fixture(scope="module")
def live_server(model_repo: Path) -> Iterator[LiveServer]:
    from rnnserve.server.errors import ShuttingDown, Unauthenticated
    from rnnserve.server.main import build_app
    from rnnserve.server.settings import Settings

    script = GuardScript()

    def guard(method: str, metadata: dict[str, str]) -> None:
        rpc = method.rsplit("/", 1)[-1]
        script.seen.append((rpc, metadata.get("authorization", "")))
        if script.require_token and metadata.get("authorization") != f"Bearer {TOKEN}":
            raise Unauthenticated("a valid bearer token is required")
        if script.unavailable.get(rpc, 0) > 0:
            script.unavailable[rpc] -= 1
            raise ShuttingDown("scripted: draining")

    settings = Settings(
        model_repo=model_repo, host="127.0.0.1", port=0, metrics_port=0, http_port=0
    )
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict = {}

    async def start() -> None:
        app = build_app(settings, guards=[guard])
        await app.start()
        holder["app"] = app

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # surfaced to the test below
            holder["error"] = exc
        ready.set()
        if "app" in holder:
            loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(120)
    if "error" in holder:
        raise holder["error"]
    app = holder["app"]
    yield LiveServer(f"127.0.0.1:{app.port}", script)
    asyncio.run_coroutine_threadsafe(app.shutdown(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


@pytest.fixture
def server(live_server: LiveServer) -> Iterator[LiveServer]:
    """The module's server with its guard script reset for one test."""
    live_server.script.unavailable.clear()
    live_server.script.require_token = False
    live_server.script.seen.clear()
    yield live_server
