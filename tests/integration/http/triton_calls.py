"""Run by the tritonclient venv (not by pytest): the real `tritonclient` calls one transport
of a running server and prints what it got as one JSON object.

usage: python triton_calls.py grpc|http HOST:PORT [TOKEN]
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main() -> None:
    transport, url = sys.argv[1], sys.argv[2]
    headers = {"authorization": f"Bearer {sys.argv[3]}"} if len(sys.argv) > 3 else None
    if transport == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(url=url)
    out: dict = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "lstm_ready": client.is_model_ready("lstm", headers=headers),
    }
    meta = client.get_model_metadata("lstm", headers=headers)
    meta = meta if isinstance(meta, dict) else {"inputs": [{"name": i.name} for i in meta.inputs]}
    out["lstm_inputs"] = [i["name"] for i in meta["inputs"]]

    def infer(model: str, arrays: dict[str, tuple[str, np.ndarray]], version: str = ""):
        inputs = []
        for name, (datatype, value) in arrays.items():
            item = tc.InferInput(name, list(value.shape), datatype)
            item.set_data_from_numpy(value)
            inputs.append(item)
        return client.infer(model, inputs, model_version=version, headers=headers)

    texts = np.array([b"the time traveller", b"it was"], dtype=object)
    scored = infer("lstm", {"text": ("BYTES", texts)}, version="1")
    out["score"] = {
        name: scored.as_numpy(name).tolist()
        for name in ("perplexity", "log_likelihood", "num_tokens")
    }
    history = np.sin(np.arange(12, dtype=np.float32) / 2).astype(np.float32)
    horizon = np.array([5], dtype=np.int64)
    got = infer("sine-gru", {"history": ("FP32", history), "horizon": ("INT64", horizon)})
    out["forecast"] = got.as_numpy("forecast").tolist()
    left, right = np.array([b"the ti"], dtype=object), np.array([b"e machine"], dtype=object)
    filled = infer("bilstm", {"left": ("BYTES", left), "right": ("BYTES", right)})
    out["infill"] = [b.decode() for b in filled.as_numpy("text").tolist()]
    try:
        infer("nope", {"text": ("BYTES", texts)})
        out["unknown_model_error"] = ""
    except InferenceServerException as exc:
        out["unknown_model_error"] = str(exc)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
