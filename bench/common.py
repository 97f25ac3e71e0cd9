"""Pieces every serving benchmark needs: a real `rnn-server` process on a free localhost port,
bare ONNX Runtime sessions with the server's thread count, percentiles, and CPU accounting.

Why shared: a benchmark is only comparable to another when both start the server, open the
model and count time the same way.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnserve.artifact.manifest import Manifest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_channel(address: str):
    """An asyncio gRPC channel with a TCP connection of its own. grpc shares one subchannel
    (one connection) between the channels of a process that have the same target and
    arguments, so without this every "client" of a benchmark would be one connection: unlike
    users, and unlike what `--workers` (SO_REUSEPORT spreads connections) needs to see."""
    import grpc

    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def pct(values, q: float, weights=None) -> float | None:
    """The q-th percentile (None when empty); `weights` repeats each value that many times."""
    if len(values) == 0:
        return None
    if weights is not None:
        values = np.repeat(np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=int))
    return float(np.percentile(values, q))


# -- bare onnxruntime ---------------------------------------------------------------------------
def ort_session(package: Path, threads: int = 1) -> tuple[ort.InferenceSession, Manifest]:
    """The model as the server opens it: CPU provider, `threads` intra-op threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(package / "model.onnx"), opts,
                                providers=["CPUExecutionProvider"])  # fmt: skip
    return sess, Manifest.load(package)


def init_state(m: Manifest, batch: int) -> dict[str, np.ndarray]:
    """Each state input at its initial value, `batch` rows along its batch axis."""
    out = {}
    for s in m.state:
        one = [d for i, d in enumerate(s.shape) if i != s.batch_axis]
        row = np.broadcast_to(np.asarray(s.init, dtype=s.dtype), one)
        out[s.input] = np.ascontiguousarray(np.stack([row] * batch, axis=s.batch_axis))
    return out


# -- CPU accounting ---------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            kids += [int(k) for k in text.split()]
    except OSError:
        pass
    return kids


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live children (Linux /proc; else None)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, seen, todo = 0.0, set(), [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            if p == pid:
                return None
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        todo += _children(p)
    return total


def machine_busy_s() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in first]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / tick, sum(ticks) / tick


def machine_info() -> dict:
    """Where and when a run was made: a results file names its run (UTC start and commit),
    so a table quoted from it can say which run it is."""
    return {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _commit(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "load_avg_at_start": os.getloadavg(),
    }


def _commit() -> str:
    """The checkout's commit (with "+dirty" when files differ from it), or "" outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def server_defaults() -> dict:
    """The settings a server started without flags runs with (for the report)."""
    from rnnserve.server.settings import Settings

    d = Settings()
    keys = ("prefill_thread", "prefill_chunk", "stream_interval_us", "decode_head",
            "decode_process", "max_batch", "max_streams", "intra_op_threads", "workers",
            "executor_threads")  # fmt: skip
    return {k: getattr(d, k) for k in keys if hasattr(d, k)}


def pin_to_cpu(cpu: int) -> bool:
    """Pins this (client) process to one CPU when the machine has more than one."""
    if cpu < 0 or not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return False
    os.sched_setaffinity(0, {cpu})
    return True


def all_cpus() -> None:
    """The server may run on every CPU, whatever this (client) process is pinned to."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


class Server:
    """A real rnn-server process on free localhost ports, ready when the constructor returns."""

    def __init__(
        self, repo: Path, extra: list[str], log: Path | None = None, profile: Path | None = None
    ) -> None:
        """`profile`: run the server under cProfile, its stats written there at exit."""
        self.port, self.metrics_port = free_port(), free_port()
        launch = [str(BIN / "rnn-server")]
        if profile is not None:
            launch = [sys.executable, "-m", "cProfile", "-o", str(profile),
                      "-m", "rnnserve.server.main"]  # fmt: skip
        self.cmd = [*launch, "--model-repo", str(repo), "--port", str(self.port),
                    "--host", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                    "--log-level", "WARNING", *extra]  # fmt: skip
        out = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, preexec_fn=all_cpus,
                                     stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        if log is not None:
            out.close()
        try:
            self._wait_serving()
        except BaseException:
            self.kill()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_serving(self, limit_s: float = 120.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + limit_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"error: rnn-server exited with {self.proc.returncode}")
                try:
                    req = health_pb2.HealthCheckRequest()
                    if stub.Check(req, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise SystemExit(f"error: rnn-server not serving after {limit_s:.0f} s")

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM (the server drains), then kill if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
