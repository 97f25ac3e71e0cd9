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


def _tensors(message: Any, where: str = "model") -> Iterator[tuple[str, Any]]:
    """Every TensorProto in `message`, at any depth, named for the message by the path to it:
    a walk over the fields protobuf reports set, not a list of where tensors may sit, so none
    is missed (a function's attribute defaults, which onnxruntime inlines, were), nor one a
    later onnx.proto adds."""
    if message.DESCRIPTOR.name == "TensorProto":
        yield f"tensor {message.name!r} ({where})" if message.name else where, message
        return
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; `label` before
        if repeated is None:
            repeated = field.label == field.LABEL_REPEATED
        values = value if repeated else [value]
        for item in values:
            yield from _tensors(item, f"{where}.{field.name}")
