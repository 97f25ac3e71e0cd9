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
from rnnserve.server.service import CANNOT_OPEN

SERVER_NAME = "rnnserve"
PLATFORM = "rnnserve"
EXTENSIONS = ["binary_tensor_data"]  # the HTTP binary tensor form (tritonclient's default)


class VersionNotReady(ServeError):
    """Metadata asked of a named version that does not serve: UNAVAILABLE (HTTP 503), as
    Triton answers "version N is not at ready state" (its GetModel's status)."""

    code = grpc.StatusCode.UNAVAILABLE


class KServeStatus:
    def __init__(self, engine: Engine, health: ModelHealth) -> None:
        self.engine = engine
        self.health = health

    async def server_ready(self) -> bool:
        """grpc.health.v1's overall status (false from SIGTERM on)."""
        return self.health.ready

    async def model_ready(self, name: str, version: str = "") -> bool:
        """True when the version (default: the model's default) serves as grpc.health.v1 says
        (not one no decode process can open) and the server is ready. UnknownModel for a name
        or version the repository does not hold."""
        repo = self.engine.repository  # UnknownModel if no such name
        entry = repo.get_any(name, version) if version else repo.default_version(name)
        return entry is not None and self.health.serves(entry) and self.health.ready

    def server_metadata(self) -> dict:
        try:
            version = metadata.version("rnnserve")
        except metadata.PackageNotFoundError:
            version = "0"
        return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str = "") -> dict:
        """Triton's ModelMetadata: with no version, the model's ready versions (highest
        first) and the highest one's tensors, or NOT_FOUND "has no available versions" when
        none is ready (it was a 200 with `versions: []`, which a client reading versions[0]
        could not use); with a version, that version alone, or UNAVAILABLE when it does not
        serve. UnknownModel for a name or version the repository does not hold."""
        repository = self.engine.repository
        ready = [v for v in repository.versions(name) if self.health.serves(v)]
        if version:
            entry = repository.get_any(name, version)
            if not self.health.serves(entry):
                why = entry.reason if not entry.serving else CANNOT_OPEN
                raise VersionNotReady(
                    f"model {name!r} version {version!r} is not at ready state: {why}"
                )
            listed = [entry.version]
        elif ready:
            entry, listed = ready[0], [v.version for v in ready]
        else:
            raise UnknownModel(
                f"model {name!r} has no available versions: none is SERVING (rnnserve.v1 "
                "GetModel gives each version's status_reason)"
            )
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
