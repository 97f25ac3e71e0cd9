"""KServe's one model lookup (server/kserve/status.py `ready_version`): metadata, infer and
ModelReady find the same version, as Triton's all go through its GetModel, including where
grpc.health.v1 and the repository differ (a version no decode process can open)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from rnnserve.server.errors import UnknownModel
from rnnserve.server.kserve.status import KServeStatus, NoReadyVersion, VersionNotReady
from rnnserve.server.repository import ModelVersion, Repository
from rnnserve.server.service import CANNOT_OPEN


@dataclass
class Health:
    """What KServeStatus reads of ModelHealth: which versions serve, and the overall state."""

    unable: set[tuple[str, str]] = field(default_factory=set)
    ready: bool = True

    def serves(self, entry: ModelVersion) -> bool:
        return entry.serving and (entry.name, entry.version) not in self.unable


def _status(health: Health) -> KServeStatus:
    """`m`: 3 failed to load, 2 loaded, 1 loaded; `dead`: 1 failed to load."""
    loaded = object()  # a version SERVING in the repository holds a model

    def version(name: str, number: str, ok: bool) -> ModelVersion:
        reason = "" if ok else "model.onnx sha256 differs"
        return ModelVersion(name, number, Path(number), model=loaded if ok else None, reason=reason)

    repository = Repository.__new__(Repository)  # its lookups read `models` alone
    repository.models = {
        "m": {n: version("m", n, ok) for n, ok in (("1", True), ("2", True), ("3", False))},
        "dead": {"1": version("dead", "1", False)},
    }
    return KServeStatus(SimpleNamespace(repository=repository), health)  # type: ignore[arg-type]


def _ready(status: KServeStatus, name: str, version: str = "") -> bool:
    return asyncio.run(status.model_ready(name, version))


def test_without_a_version_the_highest_that_serves_is_reached() -> None:
    status = _status(Health())
    assert status.ready_version("m").version == "2"  # 3 failed: passed over
    assert status.model_metadata("m")["versions"] == ["2", "1"]
    assert _ready(status, "m") and _ready(status, "m", "1")


def test_a_version_no_decode_process_can_open_is_passed_over_by_all_three() -> None:
    """2 is SERVING in the repository but grpc.health.v1 says it is not: metadata listed 1
    alone while ModelReady (reading the repository's default, 2) said the model was not
    ready, and infer ran on 2. Now all three reach 1, as Triton's latest ready version."""
    status = _status(Health(unable={("m", "2")}))
    assert status.ready_version("m").version == "1"
    assert status.model_metadata("m")["versions"] == ["1"]
    assert _ready(status, "m")
    why = re.escape(f"'2' is not at ready state: {CANNOT_OPEN}")
    with pytest.raises(VersionNotReady, match=why):
        status.ready_version("m", "2")
    assert not _ready(status, "m", "2")


def test_none_ready_and_unknown_names() -> None:
    status = _status(Health())
    with pytest.raises(NoReadyVersion, match="'dead' has no available versions"):
        status.model_metadata("dead")
    assert not _ready(status, "dead")  # false (REST 400), not an error
    with pytest.raises(VersionNotReady, match="sha256 differs"):
        status.ready_version("m", "3")
    assert not _ready(status, "m", "3")
    for name, version in (("nothing", ""), ("m", "9")):  # unknown: NOT_FOUND, on every call
        with pytest.raises(UnknownModel) as err:
            _ready(status, name, version)
        assert not isinstance(err.value, NoReadyVersion)


def test_a_draining_server_has_no_ready_model() -> None:
    status = _status(Health(ready=False))
    assert not _ready(status, "m") and status.ready_version("m").version == "2"
