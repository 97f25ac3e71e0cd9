"""KServe health and metadata as plain data, read from the same state as grpc.health.v1.

Both transports answer from here, so `/v2/health/ready`, `ServerReady` and the gRPC health
service "" can never disagree (SIGTERM turns all of them NOT ready at once).
"""

from __future__ import annotations

from importlib import metadata

from rnnserve.server.engine import Engine
from rnnserve.server.errors import UnknownModel
from rnnserve.server.health import ModelHealth
from rnnserve.server.kserve.mapping import TensorSpec, signatures_for

SERVER_NAME = "rnnserve"
PLATFORM = "rnnserve"
EXTENSIONS = ["binary_tensor_data"]  # the HTTP binary tensor form (tritonclient's default)


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
        repository = self.engine.repository
        versions = repository.versions(name)
        if version:
            entry = repository.get_any(name, version)
        else:
            entry = repository.default_version(name) or (versions[0] if versions else None)
        if entry is None:
            raise UnknownModel(f"model {name!r} has no versions")
        task = entry.manifest.task if entry.manifest else ""
        sigs = signatures_for(task)
        return {
            "name": name,
            # the versions a call may ask for (Triton lists its ready ones): one that does not
            # serve (a failed load, no decode process can open it) would only be refused
            "versions": [v.version for v in versions if v.serving and self.health.serves(v)],
            "platform": PLATFORM,
            "inputs": _described(sigs[0].inputs) if sigs else [],
            "outputs": _described(sigs[0].outputs) if sigs else [],
        }


def _described(specs: tuple[TensorSpec, ...]) -> list[dict]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]
