"""Thin OpenAI-compatible handlers: GET /v1/models, POST /v1/completions (plain and SSE),
and POST /v1/chat/completions refused with the reason (these models have no chat template).

Each prompt is one Engine.generate stream, exactly what rnnserve.v1 Generate runs; logprobs
come from scoring the prompt and the completion as Engine.score does (the same log-softmax,
unmodified distribution that Generate reports), on the version the streams ran on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web

from rnnserve.server.engine import Engine
from rnnserve.server.errors import (
    BadRequest,
    EngineUnavailable,
    UnknownModel,
    UnsupportedTask,
    status_for,
)
from rnnserve.server.health import ModelHealth
from rnnserve.server.http import completions as oa
from rnnserve.server.http.calls import Call, HttpCalls, json_response, read_json
from rnnserve.server.http.errors import openai_error
from rnnserve.server.repository import ModelVersion
from rnnserve.server.scoring import ScoreResult
from rnnserve.server.service import CANNOT_OPEN
from rnnserve.server.text import Encoded, TextCodec

DONE = b"data: [DONE]\n\n"
log = logging.getLogger("rnnserve.server.access")


@dataclass
class Finished:
    """One prompt's completion, gathered from its stream."""

    text: str = ""
    finish: str | None = None
    parts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # every token shown, a stop string's too

    @property
    def tokens(self) -> int:
        """Tokens generated, an ending <eos> included (usage.completion_tokens)."""
        return oa.generated(self.ids, self.finish)


@dataclass(frozen=True)
class Pinned:
    """The version a request resolved, and its codec, held to the request's end.

    A reload that removes the version forgets it in the repository and in the engine's
    caches, then drains and closes its decode loop (server/admin.py); it never closes the
    OnnxModel, which lives while anything holds it. So logprobs are scored on this one even
    after it is gone. New streams are not: see `OpenAIRoutes._generate`."""

    entry: ModelVersion
    codec: TextCodec


async def _all(aws: list[Awaitable]) -> list:
    """gather(), but a failure cancels the other prompts' streams."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def lm_version(engine: Engine, name: str) -> ModelVersion:
    """The model's default version, which can Generate. One that cannot (a forecaster, a
    bidirectional model, none SERVING) is not in GET /v1/models, so it is NOT_FOUND here too,
    as OpenAI and vLLM answer for a model their list does not show; the message keeps the
    reason (gRPC callers still get FAILED_PRECONDITION). vLLM's /tokenize and /detokenize
    (server/http/vllm_routes.py) look models up the same way."""
    try:
        return engine.lookup(name, "", "Generate")
    except UnsupportedTask as exc:
        raise UnknownModel(f"{exc} (GET /v1/models lists the models served here)") from None


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class OpenAIRoutes:
    def __init__(self, engine: Engine, health: ModelHealth | None = None) -> None:
        self.engine = engine
        self.health = health

    def routes(self, calls: HttpCalls) -> list[web.RouteDef]:
        return [
            web.get("/v1/models", calls.endpoint("openai.Models", self.models, openai_error)),
            web.get(
                "/v1/models/{model}", calls.endpoint("openai.Models", self.model, openai_error)
            ),
            web.post(
                "/v1/completions",
                calls.endpoint("openai.Completions", self.completions, openai_error),
            ),
            # refused, with the reason: counted as the completions call it should have been
            web.post(
                "/v1/chat/completions",
                calls.endpoint("openai.Completions", self.chat, openai_error),
            ),
        ]

    # -- models -----------------------------------------------------------------------------
    def _card(self, name: str) -> dict:
        """OpenAI's model object; `created`: when the default version's files last changed
        (its export, or its copy into the repository), in Unix seconds."""
        entry = self.engine.repository.default_version(name)
        created = int(entry.mtime) if entry is not None else 0
        return {"id": name, "object": "model", "created": created, "owned_by": "rnnserve"}

    def _serves(self, entry: ModelVersion) -> bool:
        """False for a version no decode process can open (grpc.health.v1 NOT_SERVING)."""
        return self.health is None or self.health.serves(entry)

    def _generates(self, name: str) -> bool:
        entry = self.engine.repository.default_version(name)
        return entry is not None and "Generate" in entry.rpcs and self._serves(entry)

    async def models(self, request: web.Request, call: Call) -> web.Response:
        names = [n for n in self.engine.repository.names() if self._generates(n)]
        body = {"object": "list", "data": [self._card(n) for n in names]}
        return json_response(body, request_id=call.request_id)

    def _lm(self, name: str) -> ModelVersion:
        return lm_version(self.engine, name)

    async def model(self, request: web.Request, call: Call) -> web.Response:
        name = request.match_info["model"]
        call.model = self.engine.model_label(name)
        entry = self._lm(name)
        if not self._serves(entry):  # not listed now, but it comes back: retry, not gone
            raise EngineUnavailable(f"model {name}/{entry.version} is NOT_SERVING: {CANNOT_OPEN}")
        return json_response(self._card(name), request_id=call.request_id)

    # -- chat -------------------------------------------------------------------------------
    async def chat(self, request: web.Request, call: Call) -> web.Response:
        """Refused as vLLM refuses chat for a base model without a chat template: 400
        invalid_request_error saying why, after the model is looked up (an unknown one is
        the 404 model_not_found that completions answer). These are character- or word-level
        language models trained on plain text: no roles, turns or template to render
        `messages` with, so the client is pointed to /v1/completions and a `prompt`. Users of
        OpenAI clients try chat first; a bare 404 read as a wrong URL or model."""
        body = await read_json(request)
        if not isinstance(body, dict):
            raise BadRequest("request", "the body must be a JSON object")
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise BadRequest("model", "is required (a model name from GET /v1/models)")
        call.model = self.engine.model_label(name)
        entry = self._lm(name)
        level = self.engine.codec(entry).tokenizer.config.level
        raise BadRequest(
            "model",
            f"{name!r} is a {level}-level language model with no chat template (it continues "
            "plain text: no roles or turns), so POST /v1/chat/completions cannot serve it; "
            "send the text to continue as `prompt` to POST /v1/completions",
        )

    # -- completions ------------------------------------------------------------------------
    async def completions(self, request: web.Request, call: Call) -> web.StreamResponse:
        body = await read_json(request)
        named = body.get("model") if isinstance(body, dict) else None
        call.model = self.engine.model_label(named) if isinstance(named, str) else ""
        req = oa.parse_completion(body, self.engine.settings.max_tokens)
        most = self.engine.settings.max_streams
        if len(req.prompts) > most:  # never admitted at once: a 429 would be retried in vain
            raise BadRequest(
                "prompt",
                f"holds {len(req.prompts)} prompts, more than the {most} streams this server "
                f"runs at once (--max-streams); send at most {most} per request",
            )
        entry = self._lm(req.model)
        req.version = entry.version  # a reload mid-request must not split it across versions
        pinned = Pinned(entry, self.engine.codec(entry))
        codec, limit = pinned.codec, self.engine.settings.max_prompt_tokens
        prompts = [
            codec.encode(p, "prompt" if len(req.prompts) == 1 else f"prompt[{i}]", limit)
            for i, p in enumerate(req.prompts)
        ]
        for i, enc in enumerate(prompts):  # told here: the engine's message offers a resume
            if not enc.ids:  # state, which /v1/completions has not, and names no index
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise BadRequest(
                    where, "has no token after tokenization; give text the model's tokenizer keeps"
                )
        if req.max_tokens:  # all prompts' streams admitted, or none started
            self.engine.limiter.check_room(len(prompts))
        if req.stream:
            return await self._stream(request, call, req, pinned, prompts)
        if req.max_tokens:
            done = await _all([self._collect(req, p) for p in req.prompts])
        else:  # echo with max_tokens 0: the prompt scored, nothing generated
            done = [Finished(finish="length") for _ in req.prompts]
        choices = []
        for i, (prompt, enc, got) in enumerate(zip(req.prompts, prompts, done, strict=True)):
            text = prompt + got.text if req.echo else got.text
            lp = None
            if req.logprobs is not None:
                tail = oa.past_text(got.text, [codec.piece(t) for t in got.ids])
                eos = got.finish == "eos"
                lp = await self._logprobs(req, pinned, prompt, enc, got.text, tail, eos)
            choices.append(oa.choice(i, text, got.finish, lp))
        used = oa.usage(sum(len(p.ids) for p in prompts), sum(d.tokens for d in done))
        body = oa.completion(call.request_id, int(time.time()), req.model, choices, used)
        return json_response(body, request_id=call.request_id)

    def _generate(self, req: oa.CompletionRequest, prompt: str) -> AsyncIterator[Any]:
        """A new stream of the request's version, asked for by number: a stream needs the
        version's decode loop, which a reload retires after removing the version, so the held
        entry would open a loop nobody closes. A version gone since the request began is 503
        (retry: the next try gets the new default), not a 404 saying the model is unknown."""
        try:
            return self.engine.generate(req.model, req.version, req.params(prompt), None)[1]
        except UnknownModel:
            raise EngineUnavailable(
                f"model {req.model}/{req.version} was unloaded by a reload while this request "
                "ran; retry"
            ) from None

    async def _collect(self, req: oa.CompletionRequest, prompt: str) -> Finished:
        got = Finished()
        async with contextlib.aclosing(self._generate(req, prompt)) as chunks:
            async for c in chunks:
                got.parts.append(c.text)
                got.ids += c.token_ids
                got.finish = c.finish_reason or got.finish
        got.text = "".join(got.parts)
        return got

    async def _logprobs(
        self,
        req: oa.CompletionRequest,
        pinned: Pinned,
        prompt: str,
        enc: Encoded,
        text: str,
        tail: str = "",
        eos: bool = False,
    ) -> dict:
        """Per-token log-probabilities of the completion (and of the prompt with echo; its
        first token has none: it conditions the rest). `tail`: what the tokens spelled past
        `text` (a stop string, cut from the text): its tokens are reported too, as vLLM
        reports every generated token, and as a stream's last message carries them. `eos`:
        the model ended the completion with its end-of-sequence token, which has no text but
        counts in completion_tokens: as vLLM, it is listed last (`<eos>`, at the text's end),
        scored in the same pass, after the text's tokens.

        prompt + completion is tokenized first: the tokenizer may merge the two (a run of
        spaces is one token), so only the joined text says whether there is a second token to
        score, and whether it fits --max-prompt-tokens (told as `logprobs`, not `texts`)."""
        codec, generated = pinned.codec, text + tail
        whole = codec.tokenizer.tokenize(prompt + generated)
        limit = self.engine.settings.max_prompt_tokens
        if len(whole) > limit:  # an <eos> after them adds one step: at most `limit` still
            raise BadRequest(
                "logprobs",
                f"prompt + completion have {len(whole)} tokens, more than the {limit} "
                "(--max-prompt-tokens) they can be scored in; ask fewer max_tokens",
            )
        tokens, values = list(whole[:1]), [None]
        top: list | None = [None] if req.logprobs else None
        if len(whole) + (1 if eos else 0) >= 2 and (generated or req.echo or eos):
            scored = await self._score(pinned, whole, eos, req.logprobs or 0)
            tokens += scored.tokens
            values += scored.token_logprobs
            if top is not None:
                top += scored.top_logprobs
        keep = 0 if req.echo else len(enc.tokens)
        shown = prompt + generated if req.echo else generated
        n = len(tokens) - 1 if eos else len(tokens)  # the <eos> is found nowhere in the text
        found = oa.token_logprobs(
            shown, tokens[keep:n], values[keep:n], codec.tokenizer.normalize,
            top[keep:n] if top is not None else None,
        )  # fmt: skip
        if eos:
            found = oa.ended(found, tokens[-1], values[-1], top[-1] if top else None, len(shown))
        return found

    async def _score(self, pinned: Pinned, tokens: list[str], eos: bool, top: int) -> ScoreResult:
        """Engine.score_version of a text's `tokens` (read already), and with `eos` the
        end-of-sequence token after them, which no text can bring ("<eos>" in a text is its
        characters, or a word, not the reserved token); on the pinned version, not looked up
        again: a reload may have removed it since."""
        vocab = pinned.codec.vocab
        ids, names = vocab.encode(tokens), list(tokens)
        if eos:
            ids.append(vocab.eos)
            names.append(vocab.idx_to_token[vocab.eos])
        read = Encoded(ids, names, vocab.count_unknown(tokens))
        (scored,) = await self.engine.score_encoded(pinned.entry, pinned.codec, [read], top)
        return scored

    async def _stream(
        self,
        request: web.Request,
        call: Call,
        req: oa.CompletionRequest,
        pinned: Pinned,
        prompts: list[Encoded],
    ) -> web.StreamResponse:
        async with contextlib.aclosing(self._merged(req)) as merged:
            # The first message is awaited before the headers go out, so a request the engine
            # refuses (max_tokens over the limit, stream limit reached) gets its HTTP status.
            first = await anext(merged)
            return await self._send(request, call, req, pinned, prompts, first, merged)

    async def _send(
        self,
        request: web.Request,
        call: Call,
        req: oa.CompletionRequest,
        pinned: Pinned,
        prompts: list[Encoded],
        first: tuple[int, Any],
        rest: AsyncIterator[tuple[int, Any]],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-request-id": call.request_id,
            }
        )
        head = {
            "id": f"cmpl-{call.request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
        }
        if req.include_usage:  # OpenAI: every chunk but the last has `"usage": null`
            head["usage"] = None
        generated = 0
        try:
            # the client may leave while the first token is made: its headers then meet a
            # closing transport, which is a cancel like any later write, not a server error
            await response.prepare(request)
            if req.echo:
                for i, (prompt, enc) in enumerate(zip(req.prompts, prompts, strict=True)):
                    lp = (
                        await self._logprobs(req, pinned, prompt, enc, "")
                        if req.logprobs is not None
                        else None
                    )
                    event = {**head, "choices": [oa.choice(i, prompt, None, lp)]}
                    await response.write(_event(event))
            offsets = [len(p) if req.echo else 0 for p in req.prompts]
            vocab = pinned.codec.vocab
            eos_name = vocab.idx_to_token[vocab.eos]
            async for i, c in _prepend(first, rest):
                generated += oa.generated(c.token_ids, c.finish_reason)
                lp = None
                if req.logprobs is not None:
                    # offsets count what the tokens spell: a stop string's last message
                    # carries its tokens but no text, and held-back text comes a message
                    # after its token
                    pieces = [pinned.codec.piece(t) for t in c.token_ids]
                    lp = oa.message_logprobs(pieces, c.logprob, offsets[i])
                    offsets[i] += sum(len(p) for p in pieces)
                    if c.finish_reason == "eos" and c.eos_logprob is not None:
                        # as in a plain response (and vLLM's last chunk): the <eos> the
                        # model ended on, with no text, at the end of what was spelled
                        lp = oa.ended(lp, eos_name, c.eos_logprob, None, offsets[i])
                event = {**head, "choices": [oa.choice(i, c.text, c.finish_reason, lp)]}
                await response.write(_event(event))
            if req.include_usage:
                used = oa.usage(sum(len(p.ids) for p in prompts), generated)
                await response.write(_event({**head, "choices": [], "usage": used}))
            await response.write(DONE)
        except ConnectionResetError:
            call.code, call.message = grpc.StatusCode.CANCELLED, "client went away"
        except Exception as exc:  # headers are sent: the error travels as an event
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("unhandled error in openai.Completions", exc_info=exc)
            call.code, call.message = code, message
            with contextlib.suppress(ConnectionResetError):
                await response.write(_event(openai_error(code, message, exc)))
                await response.write(DONE)
        return response

    async def _merged(self, req: oa.CompletionRequest) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, chunk) from every prompt's stream, as they come."""
        if len(req.prompts) == 1:
            async with contextlib.aclosing(self._generate(req, req.prompts[0])) as chunks:
                async for c in chunks:
                    yield 0, c
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, prompt: str) -> None:
            try:
                async with contextlib.aclosing(self._generate(req, prompt)) as chunks:
                    async for c in chunks:
                        queue.put_nowait((i, c))
            except Exception as exc:  # handed to the reader, which raises it
                queue.put_nowait((i, exc))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(req.prompts)]
        try:
            running = len(tasks)
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
