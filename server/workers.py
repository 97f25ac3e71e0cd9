"""--workers N: N rnn-server processes share one gRPC port; the parent serves merged /metrics.

Why processes: ONNX Runtime calls and protobuf work hold the GIL often enough that one
process tops out on a core. Each worker is a fresh `python -m rnnserve.server.main` with
SO_REUSEPORT on (the kernel spreads connections) and PROMETHEUS_MULTIPROC_DIR set before it
imports prometheus_client, so its metrics land in mmap files; the parent (which loads no
model) merges them with MultiProcessCollector on --metrics-port, adds every process's
process_* metrics (label `pid`), and answers /readyz while every worker is alive and ready
(rnnserve_ready, merged as the lowest). SIGTERM/SIGINT to the parent
is forwarded to every worker; each drains for --grace seconds; the parent exits 0 when they
all did. If one worker dies, the parent stops the rest and exits with its code. If the
parent dies (kill -9), each worker drains and exits (watch_parent): SO_REUSEPORT would let
orphans share the port with the next instance. For the same reason the parent refuses a
port some process already listens on (port_in_use), as a single server's bind would.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from prometheus_client import CollectorRegistry, multiprocess

from rnnserve.server.metrics import (
    ProcessesCollector,
    heartbeats_fresh,
    merged_gauge,
    serve_http,
)
from rnnserve.server.settings import WORKERS_PARENT_ENV, Settings

log = logging.getLogger("rnnserve.server.workers")
POLL_S = 0.2


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


def run_workers(settings: Settings, argv: list[str]) -> int:
    """Runs settings.workers worker processes until a signal; returns the exit status."""
    for flag, taken in (("--port", settings.port), ("--http-port", settings.http_port)):
        busy = taken and port_in_use(settings.host, taken)
        if busy:
            log.error("cannot start: %s %d is in use (%s)", flag, taken, busy)
            return 2
    port = settings.port or _free_port(settings.host)
    prom_dir = tempfile.mkdtemp(prefix="rnnserve-metrics-")
    # a worker's Admin.ReloadModels asks this process (WORKERS_PARENT_ENV) to SIGHUP them all
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": prom_dir, WORKERS_PARENT_ENV: str(os.getpid())}
    if not settings.state_key:  # one key for all: a resume token must verify on any worker
        env["RNNSERVE_STATE_KEY"] = secrets.token_hex(32)  # env, not argv: not shown by ps
    # later flags win in argparse: the workers get the shared port and no /metrics of their own
    extra = ["--port", str(port), "--metrics-port", "0", "--workers", "1", "--reuse-port", "1"]
    cmd = [sys.executable, "-m", "rnnserve.server.main", *argv, *extra]
    stop = {"signal": 0}

    def on_signal(signum, frame) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # ignored while the workers start, and inherited through exec: a SIGHUP before a worker
    # installs its handlers (still importing) would kill it, and with it the whole server;
    # it has not scanned the repository yet, so it misses nothing
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    procs: list[subprocess.Popen] = []
    try:
        if settings.metrics_port:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=prom_dir)
            registry.register(ProcessesCollector(lambda: [os.getpid(), *_live(procs)]))
            try:
                serve_http(
                    registry,
                    settings.metrics_port,
                    lambda: workers_ready(prom_dir, _live(procs), settings.workers),
                    alive=lambda: workers_alive(prom_dir),
                )
            except OSError as exc:
                log.error("cannot serve metrics on :%d: %s", settings.metrics_port, exc)
                return 2
            log.info("merged metrics of %d workers on :%d", settings.workers, settings.metrics_port)
        procs = [subprocess.Popen(cmd, env=env) for _ in range(settings.workers)]
        signal.signal(signal.SIGHUP, lambda signum, frame: _forward(procs, signal.SIGHUP))
        log.info(
            "started %d workers on %s:%d",
            len(procs),
            settings.host,
            port,
            extra={"port": port, "pids": [p.pid for p in procs]},
        )
        status = 0
        while not stop["signal"]:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                status = dead[0].returncode if dead[0].returncode > 0 else 1  # killed: 1
                log.error("worker %d exited with %d; stopping", dead[0].pid, dead[0].returncode)
                multiprocess.mark_process_dead(dead[0].pid, prom_dir)  # its gauges go too
                break
            time.sleep(POLL_S)
        return _stop_all(procs, settings) or status
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(prom_dir, ignore_errors=True)


def port_in_use(host: str, port: int) -> str | None:
    """Why `port` cannot be bound on `host` (None: free). A plain bind with SO_REUSEADDR (as
    gRPC's) fails on any listener, SO_REUSEPORT or not, and passes TIME_WAIT leftovers."""
    host = host.strip("[]")
    if host in ("", "::", "*", "0.0.0.0"):
        addresses = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:  # an unknown name: the workers' own bind reports it
            return None
        addresses = [(family, address) for family, _, _, _, address in infos]
    for family, address in addresses:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and address[0] == "::":
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(address)
        except OSError as exc:  # others (no IPv6 here): the workers' own bind reports them
            if exc.errno == errno.EADDRINUSE:
                return exc.strerror or str(exc)
    return None


async def watch_parent(parent: int, stop: asyncio.Event, period_s: float = 1.0) -> None:
    """A worker's watch on its --workers parent: once it is gone (kill -9, the OOM killer),
    sets `stop`, so the worker drains and exits instead of serving the port on its own."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.error("the --workers parent %d is gone; stopping", parent)
            stop.set()
            return
        await asyncio.sleep(period_s)


def workers_ready(prom_dir: str, live: list[int], expected: int) -> bool:
    """/readyz of the parent: `expected` workers alive, each has written its gauges, and the
    lowest rnnserve_ready is 1. A worker still importing has no file yet, and the merged
    minimum would leave it out: the instance would look ready with one worker serving."""
    if len(live) != expected:
        return False
    # prometheus_client names a process's files {type}_{mode}_{pid}.db; rnnserve_ready is a
    # livemin gauge, written (as 0) when the worker creates its Metrics
    if not all(os.path.exists(os.path.join(prom_dir, f"gauge_livemin_{pid}.db")) for pid in live):
        return False
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=prom_dir)
    return (merged_gauge(registry, "rnnserve_ready") or 0) >= 1


def workers_alive(prom_dir: str) -> bool:
    """/healthz of the parent: every worker's event loop has beaten within the last few
    seconds (a wedged worker still holds its share of the port, and of the calls)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=prom_dir)
    return heartbeats_fresh(registry, time.time())


def _live(procs: list[subprocess.Popen]) -> list[int]:
    return [p.pid for p in list(procs) if p.poll() is None]


def _forward(procs: list[subprocess.Popen], signum: int) -> None:
    """SIGHUP (hot reload) goes to every live worker."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)


def _stop_all(procs: list[subprocess.Popen], settings: Settings) -> int:
    """SIGTERM every live worker, wait what each takes to drain (--drain-delay, then up to
    --grace) + 10 s, kill stragglers; 0 if all exited 0. A worker still importing has no
    handler yet and dies of the SIGTERM (or the terminal's SIGINT): that is a stop while
    starting, 0 as in main()."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.drain_delay + settings.grace + 10
    status = 0
    for p in procs:
        try:
            code = p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
        if code in (-signal.SIGTERM, -signal.SIGINT):
            code = 0
        status = status or (0 if code == 0 else code if code > 0 else 1)
    log.info("all workers stopped")
    return status
