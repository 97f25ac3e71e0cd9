"""Prometheus metrics: names, labels and buckets as tabled in README.md#metrics.

Each Metrics owns its CollectorRegistry, so several servers in one process (tests) do not
collide. Under --workers the values live in prometheus_client's multiprocess files instead
and the parent merges them; every gauge therefore names how its workers' values combine
(`multiprocess_mode`), so `sum()` over an instance stays true. `serve_http` exposes the
registry at /metrics with /healthz and /readyz next to it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import math
import os
import platform
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# no `*_created` series: a timestamp per counter and histogram child (57 of them on a small
# zoo) that no panel or alert reads, and that --workers' merged exposition lacks anyway
disable_created_metrics()

# 1-2.5-5 per decade from 10 us (one decode step of a tiny model) to a minute-long stream.
LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# finish_reason label values of rnnserve_finished_streams_total besides the proto's reasons.
ABORTED = "aborted"  # cancelled, past its deadline, or failed: the status code says which
# rnnserve_model_serving of a version a --workers worker has unloaded: above every real
# value, so the merged minimum is real while any worker still has the version
FORGOTTEN = math.inf
ANY_ADDRESS = "::"  # where /metrics listens: every address of both stacks (see serve_http)
# /healthz waits this long for the event loop to run a callback; under the k8s liveness
# probe's timeoutSeconds (3), so the kubelet reads the 503 and its reason
LOOP_ANSWER_S = 2.0
# under --workers, /healthz fails when a worker's heartbeat (once a second) is this old
HEARTBEAT_STALE_S = 5.0


def observe_many(histogram, values: Sequence[float]) -> None:
    """histogram.observe for each value, with one lock round per bucket touched instead of two
    per value: the event loop records every token's inter-token latency, thousands a second.
    Falls back to observe() if prometheus_client's histogram internals ever change."""
    if not values:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(values) < 4:
        for v in values:
            histogram.observe(v)
        return
    histogram._raise_if_not_observable()
    total.inc(float(sum(values)))
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts):
        buckets[i].inc(int(counts[i]))


def observe_repeated(histogram, value: float, count: int) -> None:
    """histogram.observe(value) `count` times, at the cost of one: a decode step gives every
    stream of its batch the same inter-token gap, so the decode thread records each step
    once, weighted by the batch size. Falls back to observe() like observe_many."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for _ in range(count):
            histogram.observe(value)
        return
    histogram._raise_if_not_observable()
    total.inc(value * count)
    buckets[bisect.bisect_left(bounds, value)].inc(count)


class Metrics:
    """All server metrics; pass one instance to whatever records.

    `version`, `onnxruntime_version`: the labels of rnnserve_build_info (main passes the
    installed ones; tests may leave the defaults).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        version: str = "",
        onnxruntime_version: str = "",
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_* of this process (RSS, CPU, fds)

        def hist(name: str, doc: str, labels: list[str], buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.request_duration = hist(
            "rnnserve_request_duration_seconds",
            "Wall time of one RPC, from arrival to its status (streams: to the last message).",
            ["rpc", "model", "code"],
        )
        self.time_to_first_token = hist(
            "rnnserve_time_to_first_token_seconds",
            "Generate: from arrival to the first token being ready to send.",
            ["model"],
        )
        self.inter_token_latency = hist(
            "rnnserve_inter_token_latency_seconds",
            "Generate: time between consecutive tokens of one stream, as produced.",
            ["model"],
        )
        self.generated_tokens = Counter(
            "rnnserve_generated_tokens",
            "Tokens produced by Generate.",
            ["model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "rnnserve_prompt_tokens",
            "Generate: prompt tokens prefilled (a resumed stream: its new tokens plus the "
            "resumed last token). Recorded by the engine once a request is admitted.",
            ["model"],
            registry=r,
        )
        self.finished_streams = Counter(
            "rnnserve_finished_streams",
            "Generate streams that ended, by finish_reason: length, stop, eos (the proto's "
            "reasons in lower case) or aborted (cancelled, deadline, error: see the code label "
            "of rnnserve_request_duration_seconds).",
            ["model", "finish_reason"],
            registry=r,
        )
        self.live_streams = Gauge(
            "rnnserve_live_streams",
            "Generate streams admitted and not yet finished (prefilling or in the batch).",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.stream_capacity = Gauge(
            "rnnserve_stream_capacity",
            "Generate streams this process admits at once (--max-streams); compare with "
            "rnnserve_admitted_streams.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.admitted_streams = Gauge(
            "rnnserve_admitted_streams",
            "Generate streams holding one of the --max-streams slots right now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_size = hist(
            "rnnserve_batch_size",
            "Streams stepped by one ONNX Runtime decode call.",
            ["model"],
            buckets=BATCH_BUCKETS,
        )
        self.step_duration = hist(
            "rnnserve_step_duration_seconds",
            "Wall time of one batched decode step (ONNX Runtime call + token choice).",
            ["model"],
        )
        self.queue_wait = hist(
            "rnnserve_queue_wait_seconds",
            "Generate: from the call's arrival to its prompt's first prefill call (the queue).",
            ["model"],
        )
        self.model_load = hist(
            "rnnserve_model_load_seconds",
            "Time to verify and load one model version into ONNX Runtime.",
            ["model"],
        )
        self.errors = Counter(
            "rnnserve_errors",
            "RPCs that ended with a status other than OK, by code: DEADLINE_EXCEEDED when the "
            "caller's deadline passed, CANCELLED when the caller went away.",
            ["rpc", "code"],
            registry=r,
        )
        self.model_serving = Gauge(
            "rnnserve_model_serving",
            "1 when the model version is SERVING, 0 when it is loaded as NOT_SERVING or "
            "(--decode-process 1) no decode process can open it; under --workers the lowest "
            "over the workers that have it. An unloaded version has no series.",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.ready = Gauge(
            "rnnserve_ready",
            "1 while overall health is SERVING (a model version serves, or "
            "--allow-empty-repo), 0 otherwise and from SIGTERM on (under --workers: the "
            "lowest over the workers).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.loop_heartbeat = Gauge(
            "rnnserve_event_loop_heartbeat_timestamp_seconds",
            "Unix time the event loop that serves the calls last ran its once-a-second "
            "heartbeat (under --workers: the oldest over the workers); time() minus it past a "
            "few seconds means a wedged loop.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.build_info = Gauge(
            "rnnserve_build_info",
            "Always 1; the labels say which rnnserve, ONNX Runtime and Python run.",
            ["version", "onnxruntime", "python"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info.labels(
            version=version, onnxruntime=onnxruntime_version, python=platform.python_version()
        ).set(1)
        self.decode_process_cpu = Counter(
            "rnnserve_decode_process_cpu_seconds",
            "CPU time (user + system) of the --decode-process 1 children stepping this model's "
            "streams, sampled once a second; process_* covers the server process only.",
            ["model"],
            registry=r,
        )
        self.decode_process_memory = Gauge(
            "rnnserve_decode_process_resident_memory_bytes",
            "Resident memory of the --decode-process 1 children stepping this model's streams "
            "(all its versions), sampled once a second.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._samplers: list[Callable[[], None]] = []
        self._gone: set[str] = set()  # models whose last version was unloaded (forget_version)

    def track_admitted(self, read: Callable[[], int], capacity: int) -> None:
        """Publishes the admission limiter: its capacity once, its count via `read`."""
        self.stream_capacity.set(capacity)
        if _multiprocess():  # the parent reads files: a value must be written, not computed
            self._samplers.append(lambda: self.admitted_streams.set(read()))
        else:
            self.admitted_streams.set_function(read)

    def track_decode_processes(self, children: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Publishes CPU and memory of the decode children (`children`: (model, pid) pairs):
        they are other processes, so prometheus_client's process_* never sees them. CPU is a
        counter, increased by what each pid used since the last sample."""
        seen: dict[tuple[str, int], float] = {}
        shown: set[str] = set()

        def sample() -> None:
            now: dict[tuple[str, int], float] = {}
            memory: dict[str, int] = {}
            for model, pid in children():
                before = seen.get((model, pid), 0.0)
                now[(model, pid)] = before  # kept while listed: a missed read must not recount
                usage = process_usage(pid)
                if usage is None:  # gone meanwhile, or not Linux
                    continue
                cpu, rss = usage
                if cpu > before:
                    self.decode_process_cpu.labels(model=model).inc(cpu - before)
                now[(model, pid)] = max(cpu, before)
                memory[model] = memory.get(model, 0) + rss
            seen.clear()
            seen.update(now)
            for model in shown - set(memory):  # its children are gone: no memory held
                if _multiprocess():  # a worker cannot delete from its file: 0 sums right
                    self.decode_process_memory.labels(model=model).set(0)
                else:
                    with contextlib.suppress(KeyError):
                        self.decode_process_memory.remove(model)
            for model, rss in memory.items():
                self.decode_process_memory.labels(model=model).set(rss)
            shown.clear()
            shown.update(memory)

        self._samplers.append(sample)

    def sample(self) -> None:
        """Writes the values that are read from live objects (--workers: call every second)."""
        for sampler in self._samplers:
            sampler()
        if self._gone:
            self._forget_gone_models()

    def forget_version(self, name: str, version: str) -> None:
        """An unloaded version leaves rnnserve_model_serving: its series goes. Under --workers
        a worker cannot delete its entry from its file, so it writes FORGOTTEN: the livemin
        merge still shows what a worker that serves the version says, and once every worker
        has forgotten it the merged value is FORGOTTEN, which endpoints_app leaves out.

        Every other per-model series is labelled by the model's name alone, shared by all
        its versions: those go once the model's last version is unloaded (Triton drops an
        unloaded model's metrics), not while another version of it is still loaded. Streams
        that were still draining on it record their end afterwards, so the model is
        remembered and its series removed again at each `sample` until it is loaded again.
        Under --workers they stay (a worker's file keeps them until it restarts)."""
        if _multiprocess():
            self.model_serving.labels(model=name, version=version).set(FORGOTTEN)
            return
        with contextlib.suppress(KeyError):
            self.model_serving.remove(name, version)
        if name not in self._loaded_models():
            self._gone.add(name)
            self._forget_gone_models()

    def _loaded_models(self) -> set[str]:
        """The models with a loaded version: each has its rnnserve_model_serving series (set
        at load, removed at unload)."""
        return {s.labels["model"] for f in self.model_serving.collect() for s in f.samples}

    def _forget_gone_models(self) -> None:
        """Removes the series of the models in `_gone`; one loaded again leaves `_gone`."""
        self._gone -= self._loaded_models()
        if not self._gone:
            return
        for metric in self._per_model():
            for name in self._gone:
                metric.remove_by_labels({"model": name})

    def _per_model(self) -> list[MetricWrapperBase]:
        """The metrics labelled by model name alone (not rnnserve_model_serving, whose series
        are per version)."""
        found = []
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase):
                names = metric._labelnames
                if "model" in names and "version" not in names:
                    found.append(metric)
        return found

    def serve_http(
        self,
        port: int,
        ready: Callable[[], bool],
        addr: str = ANY_ADDRESS,
        alive: Callable[[], bool] | None = None,
    ) -> WSGIServer | None:
        """Starts /metrics, /healthz and /readyz in a daemon thread (port 0: disabled)."""
        if port == 0:
            log.info("metrics endpoint disabled (--metrics-port 0)")
            return None
        server = serve_http(self.registry, port, ready, addr, alive)
        host, bound = server.server_address[:2]
        log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, bound)
        return server


def process_usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, user + system; resident bytes) of a process, from Linux's /proc; None
    where it cannot be read (the process ended, another OS)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime: fields 14 and 15
    return cpu, pages * os.sysconf("SC_PAGE_SIZE")


def _multiprocess() -> bool:
    from prometheus_client import values

    return values.ValueClass.__name__ != "MutexValue"


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _IPv6WSGIServer(_ThreadingWSGIServer):
    """Listens on an IPv6 address; "::" also takes IPv4 (one dual-stack socket, as gRPC's
    "[::]" does), so probes work on IPv4, IPv6 and dual-stack clusters alike."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        dual = self.server_address[0] == "::"
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        super().server_bind()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:
        """Scrapes and probes every few seconds: no access log."""


class _Shown(Collector):
    """What /metrics shows of a registry: all of it but the rnnserve_model_serving series of
    versions every worker has unloaded (FORGOTTEN; see Metrics.forget_version). `names`:
    only those samples (the `name[]` query make_wsgi_app supports)."""

    def __init__(self, registry: Collector, names: Iterable[str] | None = None) -> None:
        self.registry = registry
        self.names = None if names is None else set(names)

    def restricted_registry(self, names: Iterable[str]) -> _Shown:
        return _Shown(self.registry, names)

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            if family.name == "rnnserve_model_serving":
                family.samples = [s for s in family.samples if s.value != FORGOTTEN]
            if self.names is not None:
                family.samples = [s for s in family.samples if s.name in self.names]
                if not family.samples:
                    continue
            yield family


def loop_answers(
    loop: asyncio.AbstractEventLoop, within_s: float = LOOP_ANSWER_S
) -> Callable[[], bool]:
    """Liveness of the server itself: True when `loop` runs a callback within `within_s`.
    /healthz is served by a thread of its own, which keeps answering while the event loop
    that serves every call is wedged (a handler blocking it, a deadlock); this asks the loop."""

    def alive() -> bool:
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # the loop is closed
            return False
        return answered.wait(within_s)

    return alive


def endpoints_app(
    registry: Collector, ready: Callable[[], bool], alive: Callable[[], bool] | None = None
) -> Callable:
    """WSGI app: /metrics (Prometheus), /healthz (200 while `alive()`, or while the process
    answers without one; else 503), /readyz (200 while `ready()`, else 503); every other path
    404, so a probe pointed at a typo fails."""
    metrics = make_wsgi_app(_Shown(registry))

    def plain(start_response, status: str, text: str) -> list[bytes]:
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode()]

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            if alive is None or alive():
                return plain(start_response, "200 OK", "ok\n")
            log.error("liveness: an event loop that serves the calls is not answering")
            return plain(start_response, "503 Service Unavailable", "event loop not answering\n")
        if path == "/readyz":
            if ready():
                return plain(start_response, "200 OK", "ready\n")
            return plain(start_response, "503 Service Unavailable", "not ready\n")
        return plain(start_response, "404 Not Found", "not found: use /metrics\n")

    return app


def serve_http(
    registry: Collector,
    port: int,
    ready: Callable[[], bool],
    addr: str = ANY_ADDRESS,
    alive: Callable[[], bool] | None = None,
) -> WSGIServer:
    """Serves endpoints_app on addr:port in a daemon thread; raises OSError if taken.
    `addr` "::" (the default): every address, IPv4 and IPv6, or IPv4 only where the host
    has no IPv6; "0.0.0.0" and other literals: that one address family."""
    app = endpoints_app(registry, ready, alive)
    addr = addr.strip("[]")
    if ":" in addr:
        try:
            server = make_server(addr, port, app, _IPv6WSGIServer, _QuietHandler)
        except OSError as exc:  # no IPv6 on this host (not: the port is taken)
            if addr != ANY_ADDRESS or exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            server = make_server("0.0.0.0", port, app, _ThreadingWSGIServer, _QuietHandler)
    else:
        server = make_server(addr, port, app, _ThreadingWSGIServer, _QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics-http").start()
    return server


class ProcessesCollector(Collector):
    """process_* metrics of several processes (--workers: the parent and each worker), each
    sample labelled with its `pid`; prometheus_client's ProcessCollector reads /proc."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self.pids = pids

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for pid in self.pids():
            one = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
            for family in one.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for s in family.samples:
                    merged.add_sample(s.name, {**s.labels, "pid": str(pid)}, s.value)
        return list(families.values())


def heartbeats_fresh(registry: Collector, now: float) -> bool:
    """Liveness of --workers' parent: the oldest worker heartbeat in `registry` (the merged
    files) is under HEARTBEAT_STALE_S old. 0 is a worker that has not beaten yet (its gauge
    starts there: loading models): still starting, alive."""
    oldest = merged_gauge(registry, "rnnserve_event_loop_heartbeat_timestamp_seconds")
    return not oldest or now - oldest < HEARTBEAT_STALE_S


def merged_gauge(registry: Collector, name: str) -> float | None:
    """The value of an unlabelled gauge as `registry` reports it (None: not reported)."""
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return None


__all__ = ["ABORTED", "LATENCY_BUCKETS", "Metrics", "ProcessesCollector", "observe_many"]
