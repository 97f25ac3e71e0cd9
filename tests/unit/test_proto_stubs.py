"""The committed gRPC stubs must match the .proto: `make proto` regenerates them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

GENERATED = ("rnnserve_pb2.py", "rnnserve_pb2.pyi", "rnnserve_pb2_grpc.py")


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    proto_dir = REPO_ROOT / "proto"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(proto_dir / "rnnserve/v1/rnnserve.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "rnnserve/v1" / name).read_text()
        committed = (proto_dir / "rnnserve/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


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
