"""Prometheus metrics: the exact names, labels and buckets of docs/contracts.md.

Each Metrics owns its CollectorRegistry, so several servers in one process (tests) do not
collide; `serve_http` exposes it at /metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Sub-millisecond ORT steps up to minute-long streams.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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


class Metrics:
    """All server metrics; pass one instance to whatever records."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

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
        self.live_streams = Gauge(
            "rnnserve_live_streams",
            "Generate streams admitted and not yet finished (prefilling or in the batch).",
            ["model"],
            registry=r,
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
            "Generate: from the end of a stream's prefill to its first batched step.",
            ["model"],
        )
        self.model_load = hist(
            "rnnserve_model_load_seconds",
            "Time to verify and load one model version into ONNX Runtime.",
            ["model"],
        )
        self.errors = Counter(
            "rnnserve_errors",
            "RPCs that ended with a status other than OK.",
            ["rpc", "code"],
            registry=r,
        )
        self.model_serving = Gauge(
            "rnnserve_model_serving",
            "1 when the model version is SERVING, 0 when it is loaded as NOT_SERVING.",
            ["model", "version"],
            registry=r,
        )

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> None:
        """Starts the /metrics endpoint in a daemon thread (port 0: disabled)."""
        if port == 0:
            log.info("metrics endpoint disabled (--metrics-port 0)")
            return
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)
