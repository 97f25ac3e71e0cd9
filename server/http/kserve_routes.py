"""Thin KServe v2 REST handlers (/v2/...): JSON (and the binary tensor form) <-> Tensors,
answered by the same mapping and status code as the KServe gRPC servicer."""

from __future__ import annotations

import json
import time

import grpc
from aiohttp import web

from rnnserve.server.engine import Engine
from rnnserve.server.errors import BadRequest
from rnnserve.server.http.calls import Call, HttpCalls, json_response, loads, read_body
from rnnserve.server.http.errors import kserve_error
from rnnserve.server.interceptors import bounded
from rnnserve.server.kserve.mapping import infer, select
from rnnserve.server.kserve.status import KServeStatus
from rnnserve.server.kserve.tensors import (
    Tensor,
    from_json,
    from_raw,
    refuse_sequence,
    refuse_unsupported,
    request_timeout,
    to_json,
    to_raw,
)
from rnnserve.server.kserve.triton import model_config, repository_index
from rnnserve.server.service import served_rpcs

HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL = "/v2/models/{name}"
VERSION = "/v2/models/{name}/versions/{version}"
REPOSITORY_MODEL = "/v2/repository/models/{name}"

# Triton's own words in its default model control mode ("none"), which scripts match on
NO_MODEL_CONTROL = "explicit model load / unload is not allowed"


def _params(obj: dict, where: str) -> dict:
    """An object's `parameters` (absent: empty); BadRequest unless it is a JSON object."""
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}.parameters", "must be an object")
    return params


def _field(obj: dict, name: str, kind: type, where: str):
    value = obj.get(name)
    if not isinstance(value, kind):
        raise BadRequest(f"{where}.{name}", f"must be a {kind.__name__}")
    return value


def parse_infer(body: bytes, header_length: str | None) -> tuple[dict, list[Tensor]]:
    """The request's JSON header and its input tensors (JSON `data` or binary parts)."""
    binary = b""
    if header_length is not None:
        # decimal ASCII digits only: int() also takes " 1_0 ", "+5" and other scripts' digits,
        # and refuses over 4,300 digits with a ValueError (a 500); 19 digits pass any body
        if not (header_length.isascii() and header_length.isdigit()):
            raise BadRequest(HEADER_LENGTH, f"is not an integer: {header_length[:40]!r}")
        if len(header_length) > 19:
            raise BadRequest(HEADER_LENGTH, f"{header_length[:40]}... is outside the body")
        n = int(header_length)
        if not 0 <= n <= len(body):
            raise BadRequest(HEADER_LENGTH, f"{n} is outside the body ({len(body)} bytes)")
        body, binary = body[:n], body[n:]
    head = loads(body)
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise BadRequest("inputs", "the body must be an object with a list `inputs`")
    if head.get("id") is not None and not isinstance(head["id"], str):
        # the protocol's id is a string: one of another type was dropped from the reply unsaid
        raise BadRequest("id", f"must be a string, got {head['id']!r}")
    tensors, at = [], 0
    for i, t in enumerate(head["inputs"]):
        if not isinstance(t, dict):
            raise BadRequest(f"inputs[{i}]", "must be an object")
        name = _field(t, "name", str, f"inputs[{i}]")
        datatype = _field(t, "datatype", str, f"inputs[{name}]")
        shape = _field(t, "shape", list, f"inputs[{name}]")
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise BadRequest(f"inputs[{name}].shape", "must be a list of integers")
        params = _params(t, f"inputs[{name}]")
        refuse_unsupported(f"inputs[{name}]", params)
        size = params.get("binary_data_size")
        if size is None:
            if "data" not in t:
                raise BadRequest(f"inputs[{name}]", "has no `data` (or binary_data_size)")
            tensors.append(from_json(name, datatype, shape, t["data"]))
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:  # true is not 1
            raise BadRequest(
                f"inputs[{name}]", f"binary_data_size must be a byte count, got {size!r}"
            )
        if at + size > len(binary):
            raise BadRequest(f"inputs[{name}]", f"binary_data_size {size} is past the body")
        tensors.append(from_raw(name, datatype, shape, binary[at : at + size]))
        at += size
    if at != len(binary):
        raise BadRequest("request", f"{len(binary) - at} binary bytes belong to no input")
    return head, tensors


def _wanted(head: dict) -> tuple[list[str], dict[str, bool]]:
    """Requested output names, and which of them go back in binary form."""
    default = _flag(_params(head, "request"), "binary_data_output", False, "parameters")
    outputs = head.get("outputs") or []
    if not isinstance(outputs, list):
        raise BadRequest("outputs", "must be a list of objects with a `name`")
    names, binary = [], {}
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest(f"outputs[{i}]", "must be an object with a `name`")
        names.append(o["name"])
        params = _params(o, f"outputs[{i}]")
        refuse_unsupported(f"outputs[{o['name']}]", params)
        binary[o["name"]] = _flag(params, "binary_data", default, f"outputs[{i}].parameters")
    return names, binary | {"*": default}


def _flag(params: dict, key: str, default: bool, where: str) -> bool:
    """A boolean parameter; a string such as "false" is refused rather than read as true."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{where}.{key}", f"must be true or false, got {value!r}")
    return value


class KServeRoutes:
    def __init__(self, engine: Engine, status: KServeStatus) -> None:
        self.engine = engine
        self.status = status

    def routes(self, calls: HttpCalls) -> list[web.RouteDef]:
        def api(rpc: str, handler) -> object:
            return calls.endpoint(f"kserve.{rpc}", handler, kserve_error)

        def probe(handler) -> object:
            return calls.probe(handler, kserve_error)

        return [
            web.get("/v2/health/live", probe(self.live)),
            web.get("/v2/health/ready", probe(self.ready)),
            web.get(MODEL + "/ready", probe(self.model_ready)),
            web.get(VERSION + "/ready", probe(self.model_ready)),
            web.get("/v2", api("ServerMetadata", self.server_metadata)),
            web.get(MODEL, api("ModelMetadata", self.model_metadata)),
            web.get(VERSION, api("ModelMetadata", self.model_metadata)),
            web.post(MODEL + "/infer", api("ModelInfer", self.infer)),
            web.post(VERSION + "/infer", api("ModelInfer", self.infer)),
            # Triton's extensions: model configuration, repository index, model control
            web.get(MODEL + "/config", api("ModelConfig", self.model_config)),
            web.get(VERSION + "/config", api("ModelConfig", self.model_config)),
            web.post("/v2/repository/index", api("RepositoryIndex", self.repository_index)),
            web.post(REPOSITORY_MODEL + "/load", api("RepositoryModelLoad", self.no_control)),
            web.post(REPOSITORY_MODEL + "/unload", api("RepositoryModelUnload", self.no_control)),
        ]

    # -- health: 200 when true; 503 (server) or 400 (model, as the protocol asks) when not --
    async def live(self, request: web.Request, call: Call) -> web.Response:
        return json_response({"live": True})

    async def ready(self, request: web.Request, call: Call) -> web.Response:
        ready = await self.status.server_ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    async def model_ready(self, request: web.Request, call: Call) -> web.Response:
        m = request.match_info
        ready = await self.status.model_ready(m["name"], m.get("version", ""))
        return json_response({"name": m["name"], "ready": ready}, 200 if ready else 400)

    # -- metadata and inference -------------------------------------------------------------
    async def server_metadata(self, request: web.Request, call: Call) -> web.Response:
        return json_response(self.status.server_metadata(), request_id=call.request_id)

    async def model_metadata(self, request: web.Request, call: Call) -> web.Response:
        m = request.match_info
        call.model = self.engine.model_label(m["name"])
        found = self.status.model_metadata(m["name"], m.get("version", ""))
        return json_response(found, request_id=call.request_id)

    async def infer(self, request: web.Request, call: Call) -> web.Response:
        start = time.perf_counter()  # Triton's parameters.timeout counts from here
        m = request.match_info
        name = m["name"]
        call.model = self.engine.model_label(name)
        # ModelMetadata's lookup, whatever the body: unknown or none ready 404, a named version
        # that does not serve 503
        version = self.status.ready_version(name, m.get("version", "")).version
        head, inputs = parse_infer(await read_body(request), request.headers.get(HEADER_LENGTH))
        params = _params(head, "request")
        refuse_sequence(params)
        timeout = request_timeout(params)
        names, binary = _wanted(head)
        deadline = start + timeout if timeout is not None else None
        version, outputs = await infer(self.engine, name, version, inputs, deadline)
        body: dict = {"model_name": name, "model_version": version}
        if isinstance(head.get("id"), str):
            body["id"] = head["id"]
        body["outputs"], parts = [], []
        for t in select(outputs, names):
            out: dict = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
            if binary.get(t.name, binary["*"]):
                raw = to_raw(t)
                out["parameters"] = {"binary_data_size": len(raw)}
                parts.append(raw)
            else:
                out["data"] = to_json(t)
            body["outputs"].append(out)
        if not parts:
            return json_response(body, request_id=call.request_id)
        head_bytes = json.dumps(body).encode()
        return web.Response(
            body=b"".join([head_bytes, *parts]),
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(len(head_bytes)), "x-request-id": call.request_id},
        )

    # -- Triton's extensions ----------------------------------------------------------------
    async def model_config(self, request: web.Request, call: Call) -> web.Response:
        """Triton's model configuration of the version metadata describes (the same lookup:
        unknown or none ready 404, a named version that does not serve 503)."""
        m = request.match_info
        call.model = self.engine.model_label(m["name"])
        entry = self.status.ready_version(m["name"], m.get("version", ""))
        rpcs = served_rpcs(entry, self.engine.settings.max_infill_vocab)
        return json_response(model_config(m["name"], entry, rpcs), request_id=call.request_id)

    async def repository_index(self, request: web.Request, call: Call) -> web.Response:
        """Triton's index; the body is empty (tritonclient sends none) or {"ready": bool}."""
        raw = await read_body(request)
        body = loads(raw) if raw.strip() else {}
        if not isinstance(body, dict):
            raise BadRequest("request", "the body must be empty or an object")
        unknown = sorted(set(body) - {"ready"})
        if unknown:
            raise BadRequest(unknown[0], "is not an index request field (only `ready`)")
        ready = body.get("ready", False)
        if not isinstance(ready, bool):  # "false" would read as true
            raise BadRequest("ready", f"must be true or false, got {ready!r}")
        found = repository_index(self.engine.repository, self.status.health, ready)
        return json_response(found, request_id=call.request_id)

    async def no_control(self, request: web.Request, call: Call) -> web.Response:
        """Load / unload refused as Triton refuses them outside its explicit model control
        mode: 503 with its words. This server serves what its repository holds; a rescan
        loads and unloads. Counted FAILED_PRECONDITION, not UNAVAILABLE: the caller asked
        for what this server does not do, which must not fire the server-side error-rate
        alert (UNAVAILABLE counts there). The message is cut as `_fail` cuts others."""
        name = request.match_info["name"]
        call.model = self.engine.model_label(name)
        action = request.path.rsplit("/", 1)[-1]
        message = (
            f"{NO_MODEL_CONTROL}: cannot {action} {name!r}; this server serves every "
            "version its model repository holds (Triton's default model control mode, "
            "none): add or remove the version's directory there, then rescan with "
            "`rnn-client reload` (rnnserve.v1 Admin.ReloadModels), SIGHUP or --poll-interval"
        )
        call.code, call.message = grpc.StatusCode.FAILED_PRECONDITION, bounded(message)
        body = kserve_error(call.code, call.message, None)
        return json_response(body, 503, call.request_id)
