"""An in-process rnn-server on an ephemeral port, run on its own event loop in a thread.

Tests talk to it with the ordinary synchronous grpc client, so they need no asyncio plugin.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from rnnserve.server.main import App, build_app
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc


class ServerThread:
    """Starts build_app(settings) in a background loop; `call` runs code on that loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.app: App | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()

        async def boot() -> App:
            app = build_app(self.settings)
            await app.start()
            return app

        self.app = self.run(boot())
        self.channel = grpc.insecure_channel(f"localhost:{self.app.port}")
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        return self

    def run(self, coro, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs a plain function on the server's loop (to read decode-loop state safely)."""

        async def wrap():
            return fn()

        return self.run(wrap())

    def stop(self, grace: float = 0.0) -> None:
        self.channel.close()
        if self.app is not None:
            self.run(self.app.shutdown(grace, delay=0.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def make_settings(repo: Path, **overrides: Any) -> Settings:
    base = Settings(
        model_repo=repo, host="localhost", port=0, metrics_port=0, http_port=0, state_key="k"
    )
    return replace(base, **overrides)
