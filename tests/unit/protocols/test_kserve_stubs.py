"""The KServe v2 .proto keeps the protocol's wire names (clients call
/inference.GRPCInferenceService/<Method>) and documents every declaration. Its stubs' freshness
is checked with every other .proto's by tests/unit/test_proto_stubs.py (`make proto`)."""

from __future__ import annotations

from tests.conftest import REPO_ROOT

PROTO = "rnnserve/kserve/grpc_predict_v2.proto"


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
