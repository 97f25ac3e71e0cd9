"""The committed gRPC stubs must match their .proto files: `make proto` regenerates them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PROTO_ROOT = REPO_ROOT / "proto"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def committed_stub_paths() -> list[Path]:
    """Every generated file the repository must hold, one set per .proto (relative paths)."""
    return [
        proto.relative_to(PROTO_ROOT).with_name(proto.stem + suffix)
        for proto in sorted((PROTO_ROOT / "rnnserve").rglob("*.proto"))
        for suffix in SUFFIXES
    ]


@pytest.mark.timeout(600)
def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    """Generated with the pinned grpcio-tools (first run installs it into .venv/protoc)."""
    subprocess.run(
        [sys.executable, str(PROTO_ROOT / "generate.py"), "--out", str(tmp_path)], check=True
    )
    stubs = committed_stub_paths()
    assert any(p.parts[:2] == ("rnnserve", "v1") for p in stubs)
    for rel in stubs:
        committed = PROTO_ROOT / rel
        assert committed.is_file(), f"{rel} is missing: run `make proto`"
        assert (tmp_path / rel).read_text() == committed.read_text(), (
            f"{rel} is stale or made by another grpcio-tools: run `make proto`"
        )


def test_stubs_carry_no_runtime_version_gate() -> None:
    """Gencode that validates the runtime version would narrow the declared protobuf range."""
    for rel in committed_stub_paths():
        text = (PROTO_ROOT / rel).read_text()
        assert "ValidateProtobufRuntimeVersion" not in text, rel
        assert "GRPC_GENERATED_VERSION" not in text, rel


def test_stubs_import_as_rnnserve_v1() -> None:
    from rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc

    names = set(rnnserve_pb2.DESCRIPTOR.services_by_name["Inference"].methods_by_name)
    assert names == {"ListModels", "GetModel", "Generate", "Score", "Infill", "Forecast"}
    assert hasattr(rnnserve_pb2_grpc, "InferenceStub")


def test_every_message_and_field_is_documented() -> None:
    """Each message, field, enum value and RPC line in the .proto has a comment above it."""
    lines = (REPO_ROOT / "proto/rnnserve/v1/rnnserve.proto").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        s = line.strip()
        declares = s.startswith(("message ", "rpc ", "enum ", "service ")) or (
            s.endswith(";") and "=" in s and not s.startswith(("//", "syntax", "package"))
        )
        if declares and not lines[i - 1].strip().startswith("//"):
            undocumented.append(s)
    assert not undocumented, undocumented
