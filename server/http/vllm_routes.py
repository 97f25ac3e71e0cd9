"""vLLM's auxiliary endpoints beside its OpenAI API, for clients and probes moving from vLLM:
GET /health, GET /version, POST /tokenize, POST /detokenize.

/tokenize and /detokenize run the model's own TextCodec (Engine.codec), the one Generate and
/v1/completions use, on the version completions would run (the model's default version,
looked up as /v1 looks it up): the ids are the ones a prompt is fed as, and the text of ids
is what a stream spells for them. No second tokenizer.
"""

from __future__ import annotations

from aiohttp import web

from rnnserve.server.engine import Engine
from rnnserve.server.errors import BadRequest
from rnnserve.server.http.calls import Call, HttpCalls, json_response, read_json
from rnnserve.server.http.errors import openai_error
from rnnserve.server.http.openai_routes import lm_version
from rnnserve.server.kserve.status import KServeStatus

TOKENIZE_FIELDS = {"model", "prompt", "add_special_tokens", "return_token_strs", "messages"}
DETOKENIZE_FIELDS = {"model", "tokens"}


def _object(body: object, known: set[str], what: str) -> dict:
    """The body as an object with only `known` fields: an unknown one is refused, as
    /v1/completions refuses one, rather than ignored."""
    if not isinstance(body, dict):
        raise BadRequest("request", "the body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(unknown[0], f"is not a {what} field this server knows")
    return body


def _model(body: dict) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        # vLLM falls back to its one served model; this server serves several
        raise BadRequest("model", "is required (a model name from GET /v1/models)")
    return name


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):  # "false" would read as true; 0 / 1 are not booleans
        raise BadRequest(name, f"must be true or false, got {value!r}")
    return value


class VLLMRoutes:
    def __init__(self, engine: Engine, status: KServeStatus) -> None:
        self.engine = engine
        self.status = status

    def routes(self, calls: HttpCalls) -> list[web.RouteDef]:
        def api(rpc: str, handler) -> object:
            return calls.endpoint(f"vllm.{rpc}", handler, openai_error)

        return [
            web.get("/health", calls.probe(self.health, openai_error)),
            web.get("/version", api("Version", self.version)),
            web.post("/tokenize", api("Tokenize", self.tokenize)),
            web.post("/detokenize", api("Detokenize", self.detokenize)),
        ]

    async def health(self, request: web.Request, call: Call) -> web.Response:
        """vLLM's answer, an empty 200, or an empty 503 when not ready: the readiness of
        /v2/health/ready and grpc.health.v1 (no model version serves yet, or SIGTERM came)."""
        ready = await self.status.server_ready()
        return web.Response(status=200 if ready else 503)

    async def version(self, request: web.Request, call: Call) -> web.Response:
        body = {"version": self.status.server_metadata()["version"]}
        return json_response(body, request_id=call.request_id)

    async def tokenize(self, request: web.Request, call: Call) -> web.Response:
        """vLLM's completion form: {model, prompt} -> {count, max_model_len, tokens,
        token_strs}. max_model_len is --max-prompt-tokens, the most a prompt may have (a
        recurrent model has no context window; completions then add up to --max-tokens),
        and a longer prompt is refused as completions refuse it. `add_special_tokens` is
        accepted either way and changes nothing: these tokenizers add no BOS or EOS (the
        models are trained and prompted on plain text), as a Hugging Face tokenizer without
        special tokens answers both the same. vLLM's chat form (`messages`) is refused as
        /v1/chat/completions is: no chat template."""
        body = _object(await read_json(request), TOKENIZE_FIELDS, "tokenize")
        name = _model(body)
        call.model = self.engine.model_label(name)
        if "messages" in body:  # as /v1/chat/completions: an unknown model is a 404 first
            lm_version(self.engine, name)
            raise BadRequest(
                "messages",
                "chat tokenization needs a chat template, which these character- or "
                "word-level language models do not have; send the text as `prompt`",
            )
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("prompt", "is required (a string)")
        _flag(body, "add_special_tokens", True)
        strings = _flag(body, "return_token_strs", False)
        entry = lm_version(self.engine, name)
        codec, limit = self.engine.codec(entry), self.engine.settings.max_prompt_tokens
        encoded = codec.encode(prompt, "prompt", limit)
        names = codec.vocab.idx_to_token
        found = {
            "count": len(encoded.ids),
            "max_model_len": limit,
            "tokens": encoded.ids,
            # the vocabulary's names of the ids (<unk> for text outside it), as vLLM's are
            # its tokenizer's names of them
            "token_strs": [names[i] for i in encoded.ids] if strings else None,
        }
        return json_response(found, request_id=call.request_id)

    async def detokenize(self, request: web.Request, call: Call) -> web.Response:
        """{model, tokens} -> {prompt}: the text a stream spells for these ids (TextCodec's
        pieces: at word level a space before each word; a reserved id, <unk> <pad> <bos>
        <eos>, spells nothing, as Generate streams it). At most --max-prompt-tokens +
        --max-tokens ids, a prompt and its completion together (vLLM bounds them by its
        max_model_len). An id outside the vocabulary is a 400 naming its index."""
        body = _object(await read_json(request), DETOKENIZE_FIELDS, "detokenize")
        name = _model(body)
        call.model = self.engine.model_label(name)
        ids = body.get("tokens")
        if not isinstance(ids, list):
            raise BadRequest("tokens", "is required (a list of token ids)")
        settings = self.engine.settings
        most = settings.max_prompt_tokens + settings.max_tokens
        if len(ids) > most:
            raise BadRequest(
                "tokens",
                f"holds {len(ids)} ids, more than the {most} of a prompt and its completion "
                "(--max-prompt-tokens + --max-tokens)",
            )
        entry = lm_version(self.engine, name)
        codec = self.engine.codec(entry)
        size = len(codec)
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < size:
                raise BadRequest(
                    f"tokens[{i}]",
                    f"{t!r} is not a token id of model {name}/{entry.version} (its vocabulary "
                    f"has ids 0..{size - 1})",
                )
        text = "".join(codec.piece(t) for t in ids)
        return json_response({"prompt": text}, request_id=call.request_id)
