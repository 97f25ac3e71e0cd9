"""A model package is self-contained: a model.onnx whose tensors name external data files is
refused.

Why: ONNX lets a tensor keep its bytes in another file (`data_location: EXTERNAL`,
`external_data {location: ...}`), which onnxruntime reads while it builds the session. The
server builds sessions from the file's bytes, and then onnxruntime resolves such a location
against the process's working directory, not the package: `etc/passwd` under the image's
working directory `/`, a tokens file or a TLS key the server can read. A graph that feeds
such a tensor to an output hands the file's bytes to any caller. rnnserve's exports never
write external data (and a package's one file could not carry it), so none is allowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# onnxruntime needs this key in every external tensor: bytes without it cannot name a file
_LOCATION_KEY = b"location"


class ExternalDataError(ValueError):
    """The graph names tensor data outside model.onnx."""


def check_self_contained(data: bytes) -> None:
    """Raises ExternalDataError when the serialized model `data` has a tensor stored
    externally. Checked on the bytes a session is built from (not the file again: one that
    changed in between would pass unseen). Bytes without the key `location` cannot name a
    file; only those holding it are parsed, so the usual package costs one scan."""
    if _LOCATION_KEY in data:
        refuse_external(data)


def refuse_external(data: bytes) -> None:
    """Raises ExternalDataError when the serialized model `data` has an external tensor."""
    import onnx  # the server and the trainer have it; the artifact's other modules do not need it

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError; unparsed, no tensor could be checked
        raise ExternalDataError(f"model.onnx is not a valid ONNX model: {exc}") from None
    for where, tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            entries = {e.key: e.value for e in tensor.external_data}
            location = entries.get("location", "")
            raise ExternalDataError(
                f"{where} keeps its data outside model.onnx (external data, location "
                f"{location[:200]!r}): a package must be one self-contained file; save the "
                "graph with its tensors inside (onnx.save(..., save_as_external_data=False))"
            )


def _tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """Every TensorProto of the model, named for the message: initializers (sparse too),
    tensors in node attributes, in subgraphs (If, Loop, Scan), functions and training info."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)
    for info in model.training_info:
        yield from _graph_tensors(info.initialization)
        yield from _graph_tensors(info.algorithm)


def _graph_tensors(graph: Any) -> Iterator[tuple[str, Any]]:
    for tensor in graph.initializer:
        yield f"initializer {tensor.name!r}", tensor
    for sparse in graph.sparse_initializer:
        yield f"sparse initializer {sparse.values.name!r}", sparse.values
        yield f"sparse initializer {sparse.values.name!r}", sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[tuple[str, Any]]:
    where = f"node {node.name or node.op_type!r}"
    for attr in node.attribute:
        if attr.HasField("t"):
            yield where, attr.t
        for tensor in attr.tensors:
            yield where, tensor
        sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for st in [*sparse, *attr.sparse_tensors]:
            yield where, st.values
            yield where, st.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)
