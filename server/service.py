"""Thin gRPC handlers: protobuf -> plain data -> Engine -> protobuf. No logic lives here."""

from __future__ import annotations

import time

import grpc

from rnnserve.server.engine import Engine, require
from rnnserve.server.generation import GenerateParams
from rnnserve.server.health import ModelHealth
from rnnserve.server.infill import infill_refusal
from rnnserve.server.repository import ModelVersion
from rnnserve.server.sampling import SamplingParams
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
}


# why a loaded version is NOT_SERVING while no decode process can open it (health says so)
CANNOT_OPEN = (
    "no decode process can open the model now (--decode-process 1): its new streams are "
    "refused until one opens it, retried once a second"
)


def served_rpcs(entry: ModelVersion, max_infill_vocab: int) -> list[str]:
    """The RPCs the version answers: its task's, less Infill past --max-infill-vocab."""
    if infill_refusal(entry, max_infill_vocab):
        return [rpc for rpc in entry.rpcs if rpc != "Infill"]
    return entry.rpcs


def version_info(
    entry: ModelVersion, health: ModelHealth | None = None, max_infill_vocab: int | None = None
) -> pb.VersionInfo:
    """A version as ListModels/GetModel describe it; with `health`, a loaded version that no
    decode process can open is NOT_SERVING, as grpc.health.v1 and KServe ModelReady say.
    `rpcs` leaves out Infill for a language model whose vocabulary is over --max-infill-vocab
    (every such call is refused: a word model of the built-in corpus has 4,601 words)."""
    status, reason = entry.status, entry.reason
    if entry.serving and health is not None and not health.serves(entry):
        status, reason = "NOT_SERVING", CANNOT_OPEN
    rpcs = entry.rpcs if max_infill_vocab is None else served_rpcs(entry, max_infill_vocab)
    m = entry.manifest
    info = pb.VersionInfo(version=entry.version, status=status, status_reason=reason, rpcs=rpcs)
    if m is not None:
        info.task, info.architecture = m.task, m.architecture
        info.hyperparameters.update({k: str(v) for k, v in m.hyperparameters.items()})
        info.vocab_size = m.vocab_size
        info.metrics.update(m.metrics)
        info.tokenizer = m.tokenizer.level if m.tokenizer else ""
        info.precision = m.precision
        for s in m.state:
            info.state.add(name=s.name, shape=s.shape, dtype=s.dtype)
    if entry.model is not None:
        info.execution_provider = entry.model.provider
    return info


def model_info(
    engine: Engine, name: str, version: str = "", health: ModelHealth | None = None
) -> pb.ModelInfo:
    versions = engine.repository.versions(name)
    default = engine.repository.default_version(name)
    if version:
        versions = [engine.repository.get_any(name, version)]
    return pb.ModelInfo(
        name=name,
        default_version=default.version if default else "",
        versions=[version_info(v, health, engine.settings.max_infill_vocab) for v in versions],
    )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.perf_counter() + remaining


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, engine: Engine, health: ModelHealth | None = None) -> None:
        self.engine = engine
        self.health = health

    async def ListModels(self, request, context):
        names = self.engine.repository.names()
        return pb.ListModelsResponse(
            models=[model_info(self.engine, n, health=self.health) for n in names]
        )

    async def GetModel(self, request, context):
        model = require(request.model, "model")
        return model_info(self.engine, model, request.version, self.health)

    async def Generate(self, request, context):
        s = request.sampling
        params = GenerateParams(
            prompt=request.prompt,
            max_tokens=request.max_tokens,
            sampling=SamplingParams(
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                seed=s.seed if s.HasField("seed") else None,
            ),
            stop=list(request.stop),
            return_state=request.return_state,
            state=request.state,
            state_every=request.state_every,
        )
        model = require(request.model, "model")
        version, chunks = self.engine.generate(model, request.version, params, _deadline(context))
        async for c in chunks:
            yield pb.GenerateResponse(
                text=c.text,
                token_id=c.token_ids[-1] if c.token_ids else -1,
                token_ids=c.token_ids,
                logprob=c.logprob,
                finish_reason=FINISH.get(c.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED),
                state=c.state,
                model_version=version,
            )
            version = ""  # the first message names it

    async def Score(self, request, context):
        model = require(request.model, "model")
        results = await self.engine.score(model, request.version, list(request.texts))
        return pb.ScoreResponse(
            results=[
                pb.ScoreResult(
                    perplexity=r.perplexity,
                    log_likelihood=r.log_likelihood,
                    num_tokens=r.num_tokens,
                    token_logprobs=r.token_logprobs,
                    unknown_tokens=r.unknown_tokens,
                    tokens=r.tokens,
                )
                for r in results
            ]
        )

    async def Infill(self, request, context):
        model = require(request.model, "model")
        found = await self.engine.infill(
            model, request.version, request.left, request.right, request.top_k
        )
        return pb.InfillResponse(
            candidates=[
                pb.InfillCandidate(text=c.text, token_id=c.token_id, probability=c.probability)
                for c in found
            ]
        )

    async def Forecast(self, request, context):
        model = require(request.model, "model")
        result = await self.engine.forecast(
            model, request.version, list(request.history), request.horizon, request.return_fitted
        )
        return pb.ForecastResponse(
            forecast=result.forecast,
            fitted=result.fitted,
            fitted_offset=result.fitted_offset,
            lower=result.lower,
            upper=result.upper,
        )
