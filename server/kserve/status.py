"""KServe health and metadata as plain data, read from the same state as grpc.health.v1.

Both transports answer from here, so `/v2/health/ready`, `ServerReady` and the gRPC health
service "" can never disagree (SIGTERM turns all of them NOT ready at once).
"""

from __future__ import annotations

from importlib import metadata

import grpc

from rnnserve.server.engine import Engine
from rnnserve.server.errors import ServeError, UnknownModel
from rnnserve.server.health import ModelHealth
from rnnserve.server.kserve.mapping import TensorSpec, signatures_for
from rnnserve.server.repository import ModelVersion
from rnnserve.server.service import CANNOT_OPEN

SERVER_NAME = "rnnserve"
PLATFORM = "rnnserve"
EXTENSIONS = ["binary_tensor_data"]  # the HTTP binary tensor form (tritonclient's default)


class VersionNotReady(ServeError):
    """A named version that does not serve (a failed load, or no decode process can open it):
    UNAVAILABLE (HTTP 503), as Triton answers "version N is not at ready state" to metadata
    and infer alike (both look the model up the same way)."""

    code = grpc.StatusCode.UNAVAILABLE


class NoReadyVersion(UnknownModel):
    """A model none of whose versions serves: NOT_FOUND (HTTP 404), Triton's "has no available
    versions", to metadata and infer alike."""


class KServeStatus:
    def __init__(self, engine: Engine, health: ModelHealth) -> None:
        self.engine = engine
        self.health = health

    async def server_ready(self) -> bool:
        """grpc.health.v1's overall status (false from SIGTERM on)."""
        return self.health.ready

    def ready_version(self, name: str, version: str = "") -> ModelVersion:
        """The version a KServe call reaches, Triton's model lookup (its metadata and infer
        share it): a named version if it serves, else VersionNotReady; without one, the
        highest version that serves (grpc.health.v1's view: not one no decode process can
        open), else NoReadyVersion. UnknownModel for a name or version the repository does not
        hold. rnnserve.v1 keeps its own answers (FAILED_PRECONDITION for a NOT_SERVING version,
        which client/failover.py reads as "this replica lacks it" while resuming)."""
        repository = self.engine.repository
        if version:
            entry = repository.get_any(name, version)
            if not self.health.serves(entry):
                why = entry.reason if not entry.serving else CANNOT_OPEN
                raise VersionNotReady(
                    f"model {name!r} version {version!r} is not at ready state: {why}"
                )
            return entry
        for entry in repository.versions(name):  # highest first
            if self.health.serves(entry):
                return entry
        raise NoReadyVersion(
            f"model {name!r} has no available versions: none is SERVING (rnnserve.v1 "
            "GetModel gives each version's status_reason)"
        )

    async def model_ready(self, name: str, version: str = "") -> bool:
        """True when `ready_version` finds a version (so ModelReady, metadata and infer agree)
        and the server is ready. UnknownModel for a name or version the repository does not
        hold (404, unlike Triton's plain false)."""
        try:
            self.ready_version(name, version)
        except (VersionNotReady, NoReadyVersion):
            return False
        return self.health.ready

    def server_metadata(self) -> dict:
        try:
            version = metadata.version("rnnserve")
        except metadata.PackageNotFoundError:
            version = "0"
        return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str = "") -> dict:
        """Triton's ModelMetadata: with no version, the model's ready versions (highest
        first) and the highest one's tensors; with a version, that version alone. Errors as
        `ready_version` (a model with no ready version was a 200 with `versions: []`, which a
        client reading versions[0] could not use)."""
        entry = self.ready_version(name, version)
        if version:
            listed = [entry.version]
        else:
            versions = self.engine.repository.versions(name)
            listed = [v.version for v in versions if self.health.serves(v)]
        task = entry.manifest.task if entry.manifest else ""
        sigs = signatures_for(task)
        return {
            "name": name,
            "versions": listed,
            "platform": PLATFORM,
            "inputs": _described(sigs[0].inputs) if sigs else [],
            "outputs": _described(sigs[0].outputs) if sigs else [],
        }


def _described(specs: tuple[TensorSpec, ...]) -> list[dict]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]
