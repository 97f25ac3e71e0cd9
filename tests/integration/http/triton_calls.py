"""Run by the tritonclient venv (not by pytest): the real `tritonclient` calls one transport
of a running server and prints what it got as one JSON object.

usage: python triton_calls.py grpc|http HOST:PORT [TOKEN] [--refusals]

--refusals: instead, the errors of the Triton extensions this server does not serve.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    transport, url = args[0], args[1]
    headers = {"authorization": f"Bearer {args[2]}"} if len(args) > 2 else None
    if transport == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(url=url)
    if "--refusals" in sys.argv:
        print(json.dumps(refusals(tc, client)))
        return
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


def refusals(tc, client) -> dict:
    """What each unserved Triton extension answers: {call: [status, message]} ("" when the
    call succeeded, which it should not)."""

    def text() -> object:
        item = tc.InferInput("text", [1], "BYTES")
        item.set_data_from_numpy(np.array([b"the time traveller"], dtype=object))
        return item

    def shm_input() -> object:
        item = tc.InferInput("text", [1], "BYTES")
        item.set_shared_memory("region", 64)
        return client.infer("lstm", [item])

    def shm_output() -> object:
        wanted = tc.InferRequestedOutput("num_tokens")
        wanted.set_shared_memory("region", 64)
        return client.infer("lstm", [text()], outputs=[wanted])

    def classification() -> object:
        wanted = tc.InferRequestedOutput("perplexity", class_count=1)
        return client.infer("lstm", [text()], outputs=[wanted])

    calls = {
        "shm_input": shm_input,
        "shm_output": shm_output,
        "classification": classification,
        "sequence": lambda: client.infer("lstm", [text()], sequence_id=7, sequence_start=True),
        "register_shm": lambda: client.register_system_shared_memory("region", "/key", 64),
        "config": lambda: client.get_model_config("lstm"),
        "statistics": lambda: client.get_inference_statistics("lstm"),
        "index": lambda: client.get_model_repository_index(),
        # Triton's request timeout (microseconds) is the call's deadline; priority is ignored
        "timeout": lambda: client.infer("lstm", [text()], timeout=1),
        "time_enough": lambda: client.infer("lstm", [text()], priority=3, timeout=30_000_000),
    }
    return _outcomes(calls, {})


def aux_endpoints(url: str) -> dict:
    """Run by test_aux_endpoints.py (`python -c`, over REST): what tritonclient.http makes of
    Triton's model configuration, repository index and model control, and an infer whose
    tensors are built from the configuration alone, as a generic Triton client builds them."""
    import tritonclient.http as tc
    from tritonclient.utils import triton_to_np_dtype

    client = tc.InferenceServerClient(url=url)
    out: dict = {
        "config": {m: client.get_model_config(m) for m in ("lstm", "bilstm", "sine-gru")},
        "config_v1": client.get_model_config("lstm", model_version="1"),
        "index": client.get_model_repository_index(),
    }
    config = out["config"]["sine-gru"]
    values = {"history": np.sin(np.arange(12) / 2), "horizon": np.array([4])}
    inputs = []
    for spec in config["input"]:
        datatype = spec["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES")
        value = values[spec["name"]].astype(triton_to_np_dtype(datatype))
        assert all(d in (-1, n) for d, n in zip(spec["dims"], value.shape, strict=True))
        item = tc.InferInput(spec["name"], list(value.shape), datatype)
        item.set_data_from_numpy(value)
        inputs.append(item)
    got = client.infer("sine-gru", inputs)
    out["forecast_outputs"] = sorted(o["name"] for o in got.get_response()["outputs"])
    calls = {
        "load": lambda: client.load_model("lstm"),
        "unload": lambda: client.unload_model("lstm", unload_dependents=True),
        "config_unknown": lambda: client.get_model_config("nope"),
    }
    return _outcomes(calls, out)


def _outcomes(calls: dict, out: dict) -> dict:
    """Each call's [status, message] into `out` (["", ""] when it succeeded)."""
    from tritonclient.utils import InferenceServerException

    for name, call in calls.items():
        try:
            call()
            out[name] = ["", ""]
        except InferenceServerException as exc:
            out[name] = [str(exc.status()), exc.message()]
    return out


if __name__ == "__main__":
    main()
