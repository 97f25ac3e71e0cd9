"""Metrics.forget_version: which series an unloaded version takes with it."""

from __future__ import annotations

from rnnserve.server.metrics import Metrics


def _models(m: Metrics) -> set[str]:
    return {
        s.labels["model"]
        for family in m.registry.collect()
        for s in family.samples
        if "model" in s.labels
    }


def _loaded(m: Metrics, *versions: tuple[str, str]) -> None:
    """What a load records for each version, and a call's series."""
    for name, version in versions:
        m.model_serving.labels(model=name, version=version).set(1)
        m.model_load.labels(model=name).observe(0.1)
        m.generated_tokens.labels(model=name).inc(3)
        m.finished_streams.labels(name, "length").inc()
        m.request_duration.labels(rpc="Generate", model=name, code="OK").observe(0.01)
        m.live_streams.labels(model=name).set(0)


def test_a_models_series_go_with_its_last_version_not_before() -> None:
    m = Metrics()
    _loaded(m, ("a", "1"), ("a", "2"), ("b", "1"))
    m.request_duration.labels(rpc="ListModels", model="", code="OK").observe(0.01)
    m.forget_version("a", "2")
    assert _models(m) == {"", "a", "b"}, "a/1 still serves under the name a"
    serving = m.registry.get_sample_value
    assert serving("rnnserve_model_serving", {"model": "a", "version": "2"}) is None
    assert serving("rnnserve_model_serving", {"model": "a", "version": "1"}) == 1
    m.forget_version("b", "1")
    assert _models(m) == {"", "a"}
    assert serving("rnnserve_generated_tokens_total", {"model": "a"}) == 6


def test_a_stream_draining_on_a_removed_model_leaves_no_series_behind() -> None:
    """A stream still running on the removed version records its end after the removal;
    the next sample removes that series again, until the model is loaded again."""
    m = Metrics()
    _loaded(m, ("a", "1"), ("b", "1"))
    m.forget_version("b", "1")
    m.finished_streams.labels("b", "aborted").inc()  # the draining stream ends
    m.request_duration.labels(rpc="Generate", model="b", code="CANCELLED").observe(1.0)
    assert "b" in _models(m)
    m.sample()
    assert _models(m) == {"a"}
    _loaded(m, ("b", "2"))  # published again
    m.sample()
    assert _models(m) == {"a", "b"}
    assert m.registry.get_sample_value("rnnserve_generated_tokens_total", {"model": "b"}) == 3
