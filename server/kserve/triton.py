"""Triton's REST extensions of the protocol, as plain data: a model's configuration (the
model_configuration extension) and the repository index (model_repository). Pure: the
routes are in server/http/kserve_routes.py.

The configuration describes the tensors KServe infer takes and returns (server/kserve/
mapping.py), not the ONNX graph's own (token ids and recurrent state, which the server feeds
itself), since those are what a Triton client sends.
"""

from __future__ import annotations

from rnnserve.server.errors import UnsupportedTask
from rnnserve.server.forecasting import Series
from rnnserve.server.health import ModelHealth
from rnnserve.server.kserve.mapping import TensorSpec, signatures_for
from rnnserve.server.repository import ModelVersion, Repository
from rnnserve.server.service import CANNOT_OPEN

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
MODEL_FILE = "model.onnx"
INTERVAL_OUTPUTS = ("lower", "upper")

# the protocol's datatype -> Triton's model-configuration data type
TRITON_TYPE = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}

READY, UNAVAILABLE = "READY", "UNAVAILABLE"


def _has_intervals(entry: ModelVersion) -> bool:
    """Whether a forecaster returns `lower` / `upper` (its manifest has intervals)."""
    try:
        return bool(Series.from_manifest(entry.manifest.series if entry.manifest else None).lower)
    except UnsupportedTask:
        return False


def model_config(name: str, entry: ModelVersion, rpcs: list[str]) -> dict:
    """Triton's ModelConfig (its JSON field names) for the version `entry`.

    max_batch_size 0: infer has no batch dimension for Triton to add (a `text` tensor of any
    shape is so many texts; a `history` is [T] or [B, T]), so `dims` are whole shapes, -1
    where any size goes (a `history` is listed [-1]: the [B, T] form is the same input).
    --max-batch is the decode batch of Generate streams, which infer does not use. The
    inputs of all the task's use cases are listed, each `optional` unless every use case
    needs it (an lm model scores `text` or fills `left` + `right`); outputs are those of
    all its use cases, `lower` / `upper` only when the forecaster has intervals. `rpcs`:
    what the version answers (GetModel's), so that an lm model past --max-infill-vocab lists
    no `left` / `right`."""
    task = entry.manifest.task if entry.manifest else ""
    sigs = [sig for sig in signatures_for(task) if sig.rpc in rpcs]
    inputs: dict[str, tuple[TensorSpec, bool]] = {}
    outputs: dict[str, TensorSpec] = {}
    for sig in sigs:
        for spec in sig.inputs:
            required = all(
                spec.name in {i.name for i in s.inputs} and spec.name not in s.optional
                for s in sigs
            )
            inputs.setdefault(spec.name, (spec, required))
        for spec in sig.outputs:
            if spec.name in INTERVAL_OUTPUTS and not _has_intervals(entry):
                continue
            outputs.setdefault(spec.name, spec)
    parameters = {"task": task, "version": entry.version}
    if entry.manifest is not None:
        parameters["architecture"] = entry.manifest.architecture
    return {
        "name": name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"all": {}},  # every version in the repository is loaded
        "max_batch_size": 0,
        "input": [
            {**_tensor(spec), "format": "FORMAT_NONE", "optional": not required}
            for spec, required in inputs.values()
        ],
        "output": [_tensor(spec) for spec in outputs.values()],
        "default_model_filename": MODEL_FILE,
        "parameters": {k: {"string_value": v} for k, v in parameters.items()},
    }


def _tensor(spec: TensorSpec) -> dict:
    return {"name": spec.name, "data_type": TRITON_TYPE[spec.datatype], "dims": list(spec.shape)}


def repository_index(repository: Repository, health: ModelHealth, ready: bool) -> list[dict]:
    """Triton's index: one entry per version in the repository, by name, highest version
    first; READY when it serves as grpc.health.v1 says (KServe ModelReady's view), else
    UNAVAILABLE with the reason (its load error, or no decode process can open it).
    `ready`: only the READY ones. A version's state is its own: it stays READY while the
    server drains (ModelReady is false then, with /v2/health/ready)."""
    found = []
    for entry in repository.all_versions():
        serves = health.serves(entry)
        if ready and not serves:
            continue
        reason = "" if serves else entry.reason or CANNOT_OPEN
        state = READY if serves else UNAVAILABLE
        found.append({"name": entry.name, "version": entry.version, "state": state,
                      "reason": reason})  # fmt: skip
    return found
