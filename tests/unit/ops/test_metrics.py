"""Metrics an SRE needs: buckets that resolve 10 us to 60 s, process and build info, the
capacity gauge, and gauges whose merge under --workers keeps sums true (two real processes
writing prometheus_client multiprocess files, merged as the --workers parent does)."""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from wsgiref.util import setup_testing_defaults

from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from rnnserve.server.metrics import LATENCY_BUCKETS, Metrics, ProcessesCollector, endpoints_app
from rnnserve.server.workers import workers_ready


def test_latency_buckets_resolve_10us_to_60s() -> None:
    assert LATENCY_BUCKETS[0] == 0.00001 and LATENCY_BUCKETS[-1] == 60
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    # no gap wider than x4 between neighbours: a quantile lands within one step
    assert all(b / a <= 4 for a, b in itertools.pairwise(LATENCY_BUCKETS))
    m = Metrics()
    m.inter_token_latency.labels(model="lstm").observe(0.000012)
    m.step_duration.labels(model="lstm").observe(0.000012)
    r = m.registry
    labels = {"model": "lstm", "le": "2.5e-05"}
    assert r.get_sample_value("rnnserve_inter_token_latency_seconds_bucket", labels) == 1
    assert r.get_sample_value("rnnserve_step_duration_seconds_bucket", labels) == 1
    below = {**labels, "le": "1e-05"}
    assert r.get_sample_value("rnnserve_step_duration_seconds_bucket", below) == 0


def test_no_created_series() -> None:
    """prometheus_client adds a `_created` timestamp per counter and histogram child; under
    --workers the merged files have none, so the two modes exposed different series."""
    m = Metrics()
    m.generated_tokens.labels(model="lstm").inc()
    m.request_duration.labels(rpc="Generate", model="lstm", code="OK").observe(0.1)
    text = generate_latest(m.registry).decode()
    assert "rnnserve_generated_tokens_total" in text
    assert "_created" not in text


def test_build_info_and_process_metrics() -> None:
    m = Metrics(version="9.9.9", onnxruntime_version="1.2.3")
    labels = {"version": "9.9.9", "onnxruntime": "1.2.3", "python": platform.python_version()}
    assert m.registry.get_sample_value("rnnserve_build_info", labels) == 1
    assert m.registry.get_sample_value("process_resident_memory_bytes") > 0
    assert m.registry.get_sample_value("process_open_fds") > 0


def test_capacity_gauges_read_the_limiter_at_scrape_time() -> None:
    m = Metrics()
    live = {"n": 0}
    m.track_admitted(lambda: live["n"], capacity=512)
    assert m.registry.get_sample_value("rnnserve_stream_capacity") == 512
    assert m.registry.get_sample_value("rnnserve_admitted_streams") == 0
    live["n"] = 7
    assert m.registry.get_sample_value("rnnserve_admitted_streams") == 7


def test_processes_collector_labels_each_pid() -> None:
    registry = CollectorRegistry()
    registry.register(ProcessesCollector(lambda: [os.getpid(), os.getppid()]))
    for pid in (os.getpid(), os.getppid()):
        value = registry.get_sample_value("process_resident_memory_bytes", {"pid": str(pid)})
        assert value and value > 0


_WORKER = textwrap.dedent(
    """
    import sys
    from rnnserve.server.metrics import Metrics
    m = Metrics(version="v", onnxruntime_version="o")
    m.model_serving.labels(model="lstm", version="1").set(1)
    m.model_serving.labels(model="gru", version="1").set(int(sys.argv[1]))
    m.live_streams.labels(model="lstm").set(3)
    m.ready.set(int(sys.argv[1]))
    m.track_admitted(lambda: 5, capacity=512)
    m.sample()
    m.generated_tokens.labels(model="lstm").inc(10)
    if "forget-gru" in sys.argv:  # its directory was removed and this worker rescanned
        m.forget_version("gru", "1")
    """
)


def _run_worker(prom_dir: Path, gru_serving: int, *flags: str) -> int:
    """Runs one worker to its end; returns its pid (its files stay, as a live worker's)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}
    argv = [sys.executable, "-c", _WORKER, str(gru_serving), *flags]
    proc = subprocess.Popen(argv, env=env)
    assert proc.wait(timeout=120) == 0
    return proc.pid


def test_two_workers_merge_into_true_sums(tmp_path: Path) -> None:
    _run_worker(tmp_path, 1)
    _run_worker(tmp_path, 0)  # this worker's gru version is NOT_SERVING
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    got = registry.get_sample_value
    assert got("rnnserve_model_serving", {"model": "lstm", "version": "1"}) == 1, "not 2"
    assert got("rnnserve_model_serving", {"model": "gru", "version": "1"}) == 0, "lowest"
    assert got("rnnserve_ready") == 0, "one worker not ready: the instance is not"
    assert got("rnnserve_live_streams", {"model": "lstm"}) == 6
    assert got("rnnserve_stream_capacity") == 1024
    assert got("rnnserve_admitted_streams") == 10
    assert got("rnnserve_generated_tokens_total", {"model": "lstm"}) == 20
    build = {"version": "v", "onnxruntime": "o", "python": platform.python_version()}
    assert got("rnnserve_build_info", build) == 1


def test_the_parent_waits_for_the_workers_drain_delay_and_grace() -> None:
    """SIGTERM to --workers: each worker drains for --drain-delay, then --grace; the parent
    must wait that long (and a margin) before it kills one."""
    import signal
    import subprocess

    from rnnserve.server import workers

    class Worker:
        def __init__(self) -> None:
            self.waited: list[float] = []
            self.signals: list[int] = []

        def poll(self):
            return None

        def send_signal(self, signum: int) -> None:
            self.signals.append(signum)

        def wait(self, timeout: float | None = None) -> int:
            self.waited.append(timeout)
            if timeout is not None and timeout < 12 + 2:  # drain delay 12 s, grace 2 s
                raise subprocess.TimeoutExpired("worker", timeout)
            return 0

        def kill(self) -> None:
            raise AssertionError("killed before its drain delay and grace ran out")

    from rnnserve.server.settings import Settings

    procs = [Worker(), Worker()]
    assert workers._stop_all(procs, Settings(drain_delay=12.0, grace=2.0)) == 0
    # each worker was told to stop and waited for: a parent that returned at once passed
    for worker in procs:
        assert worker.signals == [signal.SIGTERM]
        assert worker.waited and worker.waited[0] >= 12 + 2, worker.waited


def test_the_parent_is_ready_only_when_every_worker_has_reported_ready(tmp_path: Path) -> None:
    ready = _run_worker(tmp_path, 1)
    not_started = ready + 100_000  # alive, but has not written its gauges yet
    assert workers_ready(str(tmp_path), [ready], expected=1)
    assert not workers_ready(str(tmp_path), [ready, not_started], expected=2), "one unheard"
    assert not workers_ready(str(tmp_path), [ready], expected=2), "one worker dead"
    not_ready = _run_worker(tmp_path, 0)
    assert not workers_ready(str(tmp_path), [ready, not_ready], expected=2), "one not ready"


def _scrape(registry: CollectorRegistry, query: str = "") -> str:
    """/metrics as the --workers parent serves it (endpoints_app over the merged files)."""
    environ: dict = {"QUERY_STRING": query}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = "/metrics"
    body = endpoints_app(registry, ready=lambda: True)(environ, lambda *a: None)
    return b"".join(body).decode()


def test_an_unloaded_version_leaves_the_merged_serving_gauge(tmp_path: Path) -> None:
    """As in one process, a version whose directory was removed has no
    rnnserve_model_serving series once every worker unloaded it (0 would fire
    RnnserveModelVersionNotServing for a version that is simply gone); while some worker
    still serves it, that worker's value shows."""
    gru = 'rnnserve_model_serving{model="gru",version="1"}'
    lstm = 'rnnserve_model_serving{model="lstm",version="1"}'
    one = Metrics()
    one.model_serving.labels(model="gru", version="1").set(1)
    one.forget_version("gru", "1")
    assert gru not in _scrape(one.registry)

    def merged(*workers: tuple[str, ...]) -> CollectorRegistry:
        prom_dir = tmp_path / str(len(list(tmp_path.iterdir())))
        prom_dir.mkdir()
        for flags in workers:
            _run_worker(prom_dir, 1, *flags)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(prom_dir))
        return registry

    behind = merged(("forget-gru",), ())  # the second worker has not rescanned yet
    assert f"{gru} 1.0" in _scrape(behind)
    gone = merged(("forget-gru",), ("forget-gru",))
    for text in (_scrape(gone), _scrape(gone, "name[]=rnnserve_model_serving")):
        assert gru not in text and f"{lstm} 1.0" in text


def test_decode_process_samples_count_cpu_once_and_forget_a_gone_model(monkeypatch) -> None:
    """A child whose /proc could not be read once had its whole CPU total added again at the
    next read; a model whose children were gone kept a memory series at 0."""
    from rnnserve.server import metrics as metrics_module
    from rnnserve.server.metrics import Metrics

    m = Metrics()
    listed = [("lstm", 7)]
    reads = iter([(2.0, 100), None, (3.0, 120)])
    monkeypatch.setattr(metrics_module, "process_usage", lambda pid: next(reads))
    m.track_decode_processes(lambda: list(listed))
    cpu = lambda: m.registry.get_sample_value(  # noqa: E731
        "rnnserve_decode_process_cpu_seconds_total", {"model": "lstm"}
    )
    memory = lambda: m.registry.get_sample_value(  # noqa: E731
        "rnnserve_decode_process_resident_memory_bytes", {"model": "lstm"}
    )
    m.sample()
    assert (cpu(), memory()) == (2.0, 100)
    m.sample()  # unreadable this once
    m.sample()
    assert (cpu(), memory()) == (3.0, 120)
    listed.clear()
    m.sample()
    assert cpu() == 3.0 and memory() is None
