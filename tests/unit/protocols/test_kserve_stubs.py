"""The committed KServe v2 stubs must match grpc_predict_v2.proto (`make proto`), and keep the
protocol's wire names: clients call /inference.GRPCInferenceService/<Method>."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

PROTO = "rnnserve/kserve/grpc_predict_v2.proto"
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")


def test_committed_kserve_stubs_are_fresh(tmp_path: Path) -> None:
    proto_dir = REPO_ROOT / "proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(proto_dir / PROTO)],
        check=True,
    )  # fmt: skip
    for name in GENERATED:
        fresh = (tmp_path / "rnnserve/kserve" / name).read_text()
        committed = (proto_dir / "rnnserve/kserve" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_service_keeps_the_protocol_names() -> None:
    from rnnserve.kserve import grpc_predict_v2_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert set(service.methods_by_name) == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer",
    }  # fmt: skip
    fields = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert fields["raw_input_contents"].number == 7 and fields["inputs"].number == 5


def test_every_kserve_declaration_is_documented() -> None:
    lines = (REPO_ROOT / "proto" / PROTO).read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        s = line.strip()
        declares = s.startswith(("message ", "rpc ", "service ", "oneof ")) or (
            s.endswith(";") and "=" in s and not s.startswith(("//", "syntax", "package"))
        )
        if declares and not lines[i - 1].strip().startswith("//"):
            undocumented.append(s)
    assert not undocumented, undocumented
