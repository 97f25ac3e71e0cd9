"""rnn-server's composition root: settings -> repository -> runtime -> decode loops -> service.

Nothing else in server/ builds its own collaborators; `build_app` is what tests call to get
an in-process server on an ephemeral port, `main` is the console script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnnserve.kserve import grpc_predict_v2_pb2_grpc as kserve_grpc
from rnnserve.server import logs
from rnnserve.server.admin import AdminService, abandoned_rescans
from rnnserve.server.auth import (
    ADMIN_TOKENS_ENV,
    OpenServicesAuth,
    TokenFileError,
    access_guard,
    load_tokens,
)
from rnnserve.server.decode.limiter import StreamLimiter
from rnnserve.server.engine import Engine
from rnnserve.server.errors import ShuttingDown
from rnnserve.server.health import ModelHealth
from rnnserve.server.http.app import HttpServer, build_web_app
from rnnserve.server.http.listen import bind, ssl_context
from rnnserve.server.interceptors import CallInterceptor, Guard, InFlightCalls
from rnnserve.server.kserve.interceptor import KServeCallInterceptor
from rnnserve.server.kserve.service import SERVICE_NAME as KSERVE_SERVICE
from rnnserve.server.kserve.service import KServeService
from rnnserve.server.kserve.status import KServeStatus
from rnnserve.server.metrics import Metrics, loop_answers
from rnnserve.server.reload import Reloader
from rnnserve.server.remote_repo import RemoteRepoError, is_remote, open_model_repo
from rnnserve.server.repository import ModelVersion, Repository
from rnnserve.server.resume import StateSigner
from rnnserve.server.runtime import OnnxModel, Runtime, resolve_providers
from rnnserve.server.service import InferenceService
from rnnserve.server.settings import WORKERS_PARENT_ENV, Settings, settings_from_args
from rnnserve.server.tls import TlsConfigError, server_credentials
from rnnserve.server.tracing import RpcTracer, TracingUnavailable, otlp_provider
from rnnserve.server.workers import run_workers, watch_parent
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

log = logging.getLogger("server")


DRAIN_LINGER_S = 1.0  # refusing with UNAVAILABLE after the last call ended, before grpc stops


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
    tracer: RpcTracer | None = None
    http: HttpServer | None = None  # --http-port (OpenAI, KServe REST); None when 0
    calls: InFlightCalls = field(default_factory=InFlightCalls)  # gRPC calls in handlers
    _sampler: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        await self.health.refresh()
        self._sampler = asyncio.create_task(self._sample_metrics())

    async def _sample_metrics(self, period_s: float = 1.0) -> None:
        """Gauges read from live objects, written once a second (for --workers' files), and
        health's look at the decode processes (one that cannot open its model)."""
        while True:
            try:
                self.metrics.loop_heartbeat.set(time.time())
                self.metrics.sample()
                await self.health.recheck()
            except Exception:  # one bad pass must not end the gauges and the decode rechecks
                log.exception("sampling the gauges or rechecking health failed; retrying")
            await asyncio.sleep(period_s)

    async def shutdown(self, grace: float | None = None, delay: float | None = None) -> None:
        """Health NOT_SERVING; `delay` (--drain-delay) seconds later new calls get UNAVAILABLE
        and in-flight calls get `grace` (--grace) seconds, the port open until they end."""
        await self.health.shutdown()
        delay = self.settings.drain_delay if delay is None else delay
        if delay > 0:
            log.info("health is NOT_SERVING; still taking calls for %.1fs", delay)
            await asyncio.sleep(delay)
        self.draining = True
        self.engine.limiter.closed = True
        self.health.end_watches()
        grace = self.settings.grace if grace is None else grace
        http_stop = self.http.stop(grace) if self.http is not None else asyncio.sleep(0)
        await asyncio.gather(self._stop_grpc(grace), http_stop)
        for decoder in self.engine.decoders():
            await decoder.close()
        if self.admin is not None:  # removed versions whose streams were still draining
            await self.admin.close()
        self.engine.runtime.close()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # flushes the last spans

    async def _stop_grpc(self, grace: float) -> None:
        """Waits for the calls in flight with the port still open (new ones get the draining
        guard's UNAVAILABLE), lingers DRAIN_LINGER_S more, then lets grpc stop with what is
        left of `grace`. The linger: a client whose stream just ended sends its next call on
        the same connection at once, and grpc's stop CANCELs a call that reaches it before
        its GOAWAY does (CANCELLED, which retry policies do not retry)."""
        deadline = time.monotonic() + grace
        await self.calls.wait_idle(grace)
        await asyncio.sleep(max(0.0, min(DRAIN_LINGER_S, deadline - time.monotonic())))
        self.calls.cut = True  # a call still running now is cut: its client sees UNAVAILABLE
        await self.server.stop(max(0.0, deadline - time.monotonic()))


def build_app(
    settings: Settings,
    metrics: Metrics | None = None,
    guards: list[Guard] | None = None,
    extra_interceptors: list[grpc.aio.ServerInterceptor] | None = None,
    tracer_provider: Any = None,
) -> App:
    """Wires every part together. Call inside a running event loop. `tracer_provider`: an
    OpenTelemetry TracerProvider to trace with (tests); else --otlp-endpoint decides."""
    version = _installed("rnnserve")
    metrics = metrics or Metrics(version=version, onnxruntime_version=_onnxruntime_version())
    providers = resolve_providers(settings.providers)

    def load(path, manifest) -> OnnxModel:
        # a decode process builds its session from the loaded bytes, never from the file
        keep = bool(settings.decode_process) and manifest.task == "lm"
        return OnnxModel(
            path, manifest, providers, settings.intra_op_threads, bool(settings.decode_head),
            keep_image=keep,
        )  # fmt: skip

    def observe(entry: ModelVersion) -> None:
        metrics.model_load.labels(model=entry.name).observe(entry.load_seconds)
        metrics.model_serving.labels(model=entry.name, version=entry.version).set(
            1 if entry.serving else 0
        )

    root, remote = open_model_repo(
        settings.model_repo, settings.model_cache, settings.max_download_bytes
    )
    repository = Repository(root, load, observe, sync=remote.sync if remote else None)
    repository.scan()
    engine = Engine(
        repository,
        Runtime(settings.executor_threads),
        StreamLimiter(settings.max_streams),
        state_signer(settings),
        settings,
        metrics,
    )
    metrics.track_admitted(lambda: engine.limiter.active, settings.max_streams)
    if settings.decode_process:
        metrics.track_decode_processes(
            lambda: [(d.name, d.pid) for d in engine.decoders() if getattr(d, "pid", None)]
        )
    health = ModelHealth(
        repository,
        allow_empty=bool(settings.allow_empty_repo),
        on_change=lambda ready: metrics.ready.set(1 if ready else 0),
        decoders=engine.decoders,
        on_version=lambda entry, serving: metrics.model_serving.labels(
            model=entry.name, version=entry.version
        ).set(1 if serving else 0),
    )
    if tracer_provider is None and settings.otlp_endpoint:
        tracer_provider = otlp_provider(settings.otlp_endpoint, version)
    tracer = RpcTracer(tracer_provider, version) if tracer_provider is not None else None
    app_ref: dict[str, App] = {}

    def not_draining(method: str, metadata: dict[str, str]) -> None:
        if app_ref["app"].draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")

    interceptor = CallInterceptor(
        metrics, engine.model_label, [not_draining, *(guards or [])], tracer
    )
    health_guards = list(guards or []) if settings.auth_health else []
    kserve_interceptor = KServeCallInterceptor(
        metrics, engine.model_label, interceptor.guards, health_guards, tracer, interceptor.calls
    )
    size = settings.max_message_bytes
    server = grpc.aio.server(
        interceptors=[*(extra_interceptors or []), interceptor, kserve_interceptor],
        options=[
            ("grpc.max_receive_message_length", size),
            # replies are not capped: their size follows from limits a request already met
            # (rows, horizon, texts), and a capped one failed after all its work was done
            # (a KServe forecast batch), logged as an ERROR and counted OK; a client's own
            # receive limit still applies, with its clear RESOURCE_EXHAUSTED
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ],
    )
    pb_grpc.add_InferenceServicer_to_server(InferenceService(engine, health), server)
    admin = AdminService(engine, health)
    pb_grpc.add_AdminServicer_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    kserve_status = KServeStatus(engine, health)
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(
        KServeService(engine, kserve_status), server
    )
    names = (
        KSERVE_SERVICE,
        pb.DESCRIPTOR.services_by_name["Inference"].full_name,
        pb.DESCRIPTOR.services_by_name["Admin"].full_name,
        "grpc.health.v1.Health",
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    address = f"{settings.host}:{settings.port}"
    creds = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    http = None
    if settings.http_port:
        web_app = build_web_app(engine, kserve_status, interceptor, health_guards, size)
        tls = ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        try:
            sockets = bind(settings.host, settings.http_port, bool(settings.reuse_port))
        except OSError as exc:
            why = exc.strerror or exc
            raise RuntimeError(f"--http-port {settings.http_port}: {why}") from exc
        http = HttpServer(web_app, sockets, tls)
    app = App(server, port, engine, health, metrics, settings, admin=admin, tracer=tracer,
              http=http, calls=interceptor.calls)  # fmt: skip
    app_ref["app"] = app
    return app


MIN_STATE_KEY_BYTES = 16  # below this, warned at start (HMAC keys should be 128+ bits)


def state_signer(settings: Settings) -> StateSigner:
    """Signs resume tokens with --state-key, verifies with it and --state-key-previous.

    Every key is stripped, the current one like the previous ones: a key read from a secret
    file often ends in a newline, and replicas (or a rotation's NEW + OLD) that disagree on it
    would refuse each other's tokens. With --state-max-age, older tokens are refused.
    The keys as given, whitespace kept, still verify (they never sign): servers before the
    strip signed with them, and their tokens (streams failing over during the rolling update,
    saved resume files) were refused with no way to accept them, --state-key-previous being
    stripped too."""
    given = [settings.state_key, *settings.state_key_previous.split(",")]
    key = settings.state_key.strip()
    if key and len(key.encode()) < MIN_STATE_KEY_BYTES:
        # any resume token a client holds lets it test guesses of the key offline
        log.warning(
            "--state-key is %d bytes: a short secret can be guessed offline from any resume "
            "token; use %d or more random bytes (e.g. openssl rand -hex 32)",
            len(key.encode()), MIN_STATE_KEY_BYTES,
        )  # fmt: skip
    previous = [k.strip() for k in given[1:] if k.strip()]
    unstripped = [k for k in given if k.strip() and k != k.strip()]
    accepted = list(dict.fromkeys(previous + unstripped))
    return StateSigner(settings.state_key.strip(), accepted, max_age=settings.state_max_age)


async def serve(settings: Settings) -> int:
    """Runs until SIGTERM/SIGINT, then drains within --grace seconds.

    /metrics, /healthz and /readyz listen before the models load (or download): the process
    is alive from its start and ready once loaded, as Triton's live and ready, so a long load
    neither fails a liveness or startup probe nor reads as a replica down (`up == 0`)."""
    loop = asyncio.get_running_loop()
    metrics = Metrics(version=_installed("rnnserve"), onnxruntime_version=_onnxruntime_version())
    built: list[App] = []  # the app, once its models are loaded
    status = -1  # until _serve returns: a stop while starting raises through
    answers = loop_answers(loop)
    try:
        endpoints = metrics.serve_http(
            settings.metrics_port,
            ready=lambda: bool(built) and built[0].health.ready,
            # while loading, the event loop is busy with the load by design: not a wedge
            alive=lambda: not built or answers(),
        )
    except OSError as exc:
        log.error("cannot start: --metrics-port %d: %s", settings.metrics_port, exc.strerror)
        return 2
    try:
        status = await _serve(settings, metrics, built)
    finally:
        if status and endpoints is not None:  # it did not start: free the port (in-process
            endpoints.shutdown()  # callers); after a run the process ends, and with it the
            endpoints.server_close()  # thread (shutdown() would wait out its 0.5 s poll)
    return status


async def _serve(settings: Settings, metrics: Metrics, built: list[App]) -> int:
    try:
        tokens = load_tokens(settings.tokens_file)
        admin_tokens = load_tokens(settings.admin_tokens_file, variable=ADMIN_TOKENS_ENV)
        if settings.auth_health and not tokens:  # asked to close health, and nothing is closed
            raise TokenFileError(
                "--auth-health 1 needs a token (--tokens-file or RNNSERVE_TOKENS); without one "
                "every call, health included, is open"
            )
        guard = access_guard(tokens, admin_tokens)
        guards = [guard] if guard else []
        extra = [OpenServicesAuth(guards[0])] if guards and settings.auth_health else []
        app = build_app(settings, metrics, guards=guards, extra_interceptors=extra)
    except (TokenFileError, TlsConfigError, TracingUnavailable) as exc:
        log.error("cannot start: %s", exc)
        return 2
    except RuntimeError as exc:  # e.g. the port is taken
        log.error("cannot start: %s", exc)
        return 2
    # the models are loaded: from here a stop drains (main's start-up handler ends here)
    built.append(app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    log.info(
        "rnn-server listening on %s:%d",
        settings.host,
        app.port,
        extra={
            "port": app.port,
            "http_port": app.http.port if app.http else 0,
            "models": app.engine.repository.names(),
        },
    )
    reloader = Reloader(admin=app.admin, poll_interval=settings.poll_interval)
    reloader.start()
    if _HUPS_WHILE_STARTING:  # one rescan for them: what they announced may be newer than the load
        _HUPS_WHILE_STARTING.clear()
        reloader.trigger("SIGHUP while starting")
    parent = os.environ.get(WORKERS_PARENT_ENV, "")  # set for a --workers worker
    watcher = asyncio.create_task(watch_parent(int(parent), stop)) if parent.isdigit() else None
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    await reloader.stop()
    log.info(
        "shutting down: drain delay %.1fs, then up to %.1fs for in-flight calls",
        settings.drain_delay,
        settings.grace,
    )
    await app.shutdown()
    log.info("stopped")
    return 0


class _StoppedWhileStarting(BaseException):
    """SIGTERM/SIGINT before serve() installs its draining handlers. A BaseException, so no
    `except Exception` on the way (a failed model load only marks its version NOT_SERVING,
    a failed remote sync is logged) can swallow it."""


def _stop_while_starting(signum: int, frame: Any) -> None:
    raise _StoppedWhileStarting(signum)


# SIGHUPs that came before the reloader listened (its default action would kill a server
# still loading; under --workers the parent sends one to every worker on any ReloadModels)
_HUPS_WHILE_STARTING: list[int] = []


def _hup_while_starting(signum: int, frame: Any) -> None:
    _HUPS_WHILE_STARTING.append(signum)


def _installed(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _onnxruntime_version() -> str:
    import onnxruntime  # already loaded by server/runtime.py

    return onnxruntime.__version__


def main(argv: list[str] | None = None) -> int:
    """The console script. SIGTERM/SIGINT while the models load or download exits 0 at once
    (nothing to drain yet); with no handler, SIGTERM would kill the process (status 143), or
    be ignored until SIGKILL where it is PID 1 (a container's entrypoint)."""
    if threading.current_thread() is threading.main_thread():  # signal.signal's rule
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop_while_starting)
        signal.signal(signal.SIGHUP, _hup_while_starting)
    try:
        return _main(argv)
    except _StoppedWhileStarting as stopped:
        log.info("stopped by %s while starting", signal.Signals(stopped.args[0]).name)
        return 0


def _main(argv: list[str] | None) -> int:
    settings = settings_from_args(argv)
    logs.configure(settings.log_level)
    if is_remote(settings.model_repo):
        try:  # an unknown protocol or a missing extra is a usage error, not a crash loop
            open_model_repo(settings.model_repo, settings.model_cache)
        except RemoteRepoError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif not open_model_repo(settings.model_repo)[0].is_dir():
        print(f"error: model repository {settings.model_repo} is not a directory", file=sys.stderr)
        return 2
    if settings.workers > 1:
        return run_workers(settings, list(sys.argv[1:] if argv is None else argv))
    try:
        status = asyncio.run(serve(settings))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if abandoned_rescans():
        # a rescan still loading (a hung mount, a huge model) must not hold the exit, nor run
        # on inside onnxruntime while the interpreter tears down (a crash at exit): leave now
        log.warning("exiting with a model load still running (abandoned)")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
