"""rnn-server's composition root: settings -> repository -> runtime -> scheduler -> service.

Nothing else in server/ builds its own collaborators; `build_app` is what tests call to get
an in-process server on an ephemeral port, `main` is the console script.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnnserve.server import logs
from rnnserve.server.admin import AdminService
from rnnserve.server.auth import OpenServicesAuth, TokenFileError, bearer_guard, load_tokens
from rnnserve.server.engine import Engine
from rnnserve.server.errors import ShuttingDown
from rnnserve.server.health import ModelHealth
from rnnserve.server.interceptors import CallInterceptor, Guard
from rnnserve.server.metrics import Metrics
from rnnserve.server.reload import Reloader
from rnnserve.server.repository import ModelVersion, Repository
from rnnserve.server.resume import StateSigner
from rnnserve.server.runtime import OnnxModel, Runtime, resolve_providers
from rnnserve.server.scheduler import StreamLimiter
from rnnserve.server.service import InferenceService
from rnnserve.server.settings import Settings, settings_from_args
from rnnserve.server.tls import TlsConfigError, server_credentials
from rnnserve.server.workers import run_workers
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

log = logging.getLogger("server")


@dataclass
class App:
    """A built (not yet started) server and the parts tests and operators poke at."""

    server: grpc.aio.Server
    port: int
    engine: Engine
    health: ModelHealth
    metrics: Metrics
    settings: Settings
    draining: bool = False
    admin: AdminService | None = None

    async def start(self) -> None:
        await self.server.start()
        await self.health.refresh()

    async def shutdown(self, grace: float | None = None, delay: float | None = None) -> None:
        """Health NOT_SERVING; `delay` (--drain-delay) seconds later new calls get UNAVAILABLE
        and in-flight calls get `grace` (--grace) seconds."""
        await self.health.shutdown()
        delay = self.settings.drain_delay if delay is None else delay
        if delay > 0:
            log.info("health is NOT_SERVING; still taking calls for %.1fs", delay)
            await asyncio.sleep(delay)
        self.draining = True
        self.engine.limiter.closed = True
        await self.server.stop(self.settings.grace if grace is None else grace)
        for sched in self.engine.schedulers():
            await sched.close()
        self.engine.runtime.close()


def build_app(
    settings: Settings,
    metrics: Metrics | None = None,
    guards: list[Guard] | None = None,
    extra_interceptors: list[grpc.aio.ServerInterceptor] | None = None,
) -> App:
    """Wires every part together. Call inside a running event loop."""
    metrics = metrics or Metrics()
    providers = resolve_providers(settings.providers)

    def load(path, manifest) -> OnnxModel:
        return OnnxModel(
            path, manifest, providers, settings.intra_op_threads, bool(settings.decode_head)
        )

    def observe(entry: ModelVersion) -> None:
        metrics.model_load.labels(model=entry.name).observe(entry.load_seconds)
        metrics.model_serving.labels(model=entry.name, version=entry.version).set(
            1 if entry.serving else 0
        )

    repository = Repository(settings.model_repo, load, observe)
    repository.scan()
    engine = Engine(
        repository,
        Runtime(settings.executor_threads),
        StreamLimiter(settings.max_streams),
        StateSigner(settings.state_key),
        settings,
        metrics,
    )
    health = ModelHealth(repository)
    app_ref: dict[str, App] = {}

    def not_draining(method: str, metadata: dict[str, str]) -> None:
        if app_ref["app"].draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")

    interceptor = CallInterceptor(metrics, engine.model_label, [not_draining, *(guards or [])])
    size = settings.max_message_bytes
    server = grpc.aio.server(
        interceptors=[*(extra_interceptors or []), interceptor],
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ],
    )
    pb_grpc.add_InferenceServicer_to_server(InferenceService(engine), server)
    admin = AdminService(engine, health)
    pb_grpc.add_AdminServicer_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    names = (
        pb.DESCRIPTOR.services_by_name["Inference"].full_name,
        pb.DESCRIPTOR.services_by_name["Admin"].full_name,
        "grpc.health.v1.Health",
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    address = f"{settings.host}:{settings.port}"
    creds = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    app = App(server, port, engine, health, metrics, settings, admin=admin)
    app_ref["app"] = app
    return app


async def serve(settings: Settings) -> int:
    """Runs until SIGTERM/SIGINT, then drains within --grace seconds."""
    try:
        tokens = load_tokens(settings.tokens_file)
        guards = [bearer_guard(tokens)] if tokens else []
        extra = [OpenServicesAuth(guards[0])] if guards and settings.auth_health else []
        app = build_app(settings, guards=guards, extra_interceptors=extra)
    except (TokenFileError, TlsConfigError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    except RuntimeError as exc:  # e.g. the port is taken
        log.error("cannot start: %s", exc)
        return 2
    app.metrics.serve_http(settings.metrics_port)
    await app.start()
    log.info(
        "rnn-server listening on %s:%d",
        settings.host,
        app.port,
        extra={"port": app.port, "models": app.engine.repository.names()},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader = Reloader(admin=app.admin, poll_interval=settings.poll_interval)
    reloader.start()
    await stop.wait()
    await reloader.stop()
    log.info(
        "shutting down: drain delay %.1fs, then up to %.1fs for in-flight calls",
        settings.drain_delay,
        settings.grace,
    )
    await app.shutdown()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_args(argv)
    logs.configure(settings.log_level)
    if not settings.model_repo.is_dir():
        print(f"error: model repository {settings.model_repo} is not a directory", file=sys.stderr)
        return 2
    if settings.workers > 1:
        return run_workers(settings, list(sys.argv[1:] if argv is None else argv))
    try:
        return asyncio.run(serve(settings))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
