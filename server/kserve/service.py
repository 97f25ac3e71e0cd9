"""Thin KServe v2 gRPC handlers: protobuf -> Tensors -> mapping/status -> protobuf."""

from __future__ import annotations

import time

from google.protobuf import json_format

from rnnserve.kserve import grpc_predict_v2_pb2 as pb
from rnnserve.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from rnnserve.server.engine import Engine, require
from rnnserve.server.errors import BadRequest
from rnnserve.server.kserve.mapping import infer, select
from rnnserve.server.kserve.status import KServeStatus
from rnnserve.server.kserve.tensors import (
    Tensor,
    from_contents,
    from_raw,
    refuse_sequence,
    refuse_unsupported,
    request_timeout,
    to_raw,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def request_tensors(request: pb.ModelInferRequest) -> list[Tensor]:
    """The inputs, from raw_input_contents (one per input, in order) or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            "raw_input_contents", f"has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    tensors = []
    for i, t in enumerate(request.inputs):
        refuse_unsupported(f"inputs[{t.name}]", t.parameters)
        shape = list(t.shape)
        if raw:
            if t.HasField("contents"):
                raise BadRequest(f"inputs[{t.name}]", "has contents and raw_input_contents")
            tensors.append(from_raw(t.name, t.datatype, shape, raw[i]))
        else:
            tensors.append(from_contents(t.name, t.datatype, shape, t.contents))
    return tensors


def parameter_values(parameters) -> dict[str, object]:
    """A request's InferParameter map as plain values (an unset one reads False)."""
    return {
        key: getattr(value, value.WhichOneof("parameter_choice") or "bool_param")
        for key, value in parameters.items()
    }


class KServeService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, status: KServeStatus) -> None:
        self.engine = engine
        self.status = status

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.status.server_ready())

    async def ModelReady(self, request, context):
        name = require(request.name, "name")
        return pb.ModelReadyResponse(ready=await self.status.model_ready(name, request.version))

    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(self.status.server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request, context):
        found = self.status.model_metadata(require(request.name, "name"), request.version)
        return json_format.ParseDict(found, pb.ModelMetadataResponse())

    async def ModelInfer(self, request, context):
        start = time.perf_counter()
        model = require(request.model_name, "model_name")
        # looked up as ModelMetadata looks it up (Triton's one lookup), whatever the tensors:
        # unknown or none ready NOT_FOUND, a named version that does not serve UNAVAILABLE
        version = self.status.ready_version(model, request.model_version).version
        params = parameter_values(request.parameters)
        refuse_sequence(params)
        timeout = request_timeout(params)  # the gRPC deadline, if sooner, ends the call too
        inputs = request_tensors(request)
        for o in request.outputs:
            refuse_unsupported(f"outputs[{o.name}]", o.parameters)
        deadline = start + timeout if timeout is not None else None
        version, outputs = await infer(self.engine, model, version, inputs, deadline)
        outputs = select(outputs, [o.name for o in request.outputs])
        response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
        for t in outputs:
            response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            response.raw_output_contents.append(to_raw(t))
        return response
