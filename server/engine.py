"""The server's use cases in plain Python: look up a model version, check the task, run it.

`Engine` holds what the composition root built (repository, runtime, limiter, signer,
settings, metrics) and keeps one DecodeLoop, Generator and TextCodec per serving version.
The gRPC service only converts protobuf to these calls and back.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from rnnserve.server.decode.limiter import CallLimiter, StreamLimiter
from rnnserve.server.decode.loop import DecodeLoop
from rnnserve.server.decode.process import DecodeProcess, LoopConfig
from rnnserve.server.decode.stream import Chunk
from rnnserve.server.errors import BadRequest
from rnnserve.server.forecasting import ForecastResult, forecast
from rnnserve.server.generation import GenerateParams, Generator, check_task
from rnnserve.server.infill import Candidate, infill
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import ModelVersion, Repository
from rnnserve.server.resume import StateSigner
from rnnserve.server.runtime import Runtime
from rnnserve.server.scoring import Encoded, ScoreResult, encode_texts, score
from rnnserve.server.settings import Settings
from rnnserve.server.text import TextCodec


class Engine:
    def __init__(
        self,
        repository: Repository,
        runtime: Runtime,
        limiter: StreamLimiter,
        signer: StateSigner,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.repository = repository
        self.runtime = runtime
        self.limiter = limiter
        self.signer = signer
        self.settings = settings
        self.metrics = metrics
        self.calls = CallLimiter(settings.max_calls)
        self._decoders: dict[tuple[str, str], DecodeLoop | DecodeProcess] = {}
        self._generators: dict[tuple[str, str], Generator] = {}
        self._codecs: dict[tuple[str, str], TextCodec] = {}

    # -- per-version helpers ----------------------------------------------------------------
    def lookup(self, model: str, version: str, rpc: str) -> ModelVersion:
        entry = self.repository.get(model, version)
        check_task(entry, rpc)
        return entry

    def decoder(self, entry: ModelVersion) -> DecodeLoop | DecodeProcess:
        """The version's decode loop, made on its first Generate: with --decode-process 1 its
        steps run in a process of its own (started now; it opens the model while the first
        joins queue in the pipe), else in a thread of this process."""
        key = (entry.name, entry.version)
        if key not in self._decoders:
            assert entry.model is not None
            s = self.settings
            config = LoopConfig(
                s.max_batch,
                s.stream_interval_us * 1e-6,
                s.prefill_chunk,
                bool(s.prefill_thread),
                s.prefill_batch,
            )
            if s.decode_process:
                self._decoders[key] = DecodeProcess(entry.name, entry.model, self.metrics, config)
            else:
                self._decoders[key] = DecodeLoop(
                    entry.name,
                    entry.model,
                    self.metrics,
                    config.max_batch,
                    config.stream_interval,
                    config.prefill_chunk,
                    config.prefill_thread,
                    prefill_batch=config.prefill_batch,
                )
        return self._decoders[key]

    def pop_decoder(self, name: str, version: str) -> DecodeLoop | DecodeProcess | None:
        """Forgets a version's helpers (hot reload); returns its decode loop to drain."""
        key = (name, version)
        self._generators.pop(key, None)
        self._codecs.pop(key, None)
        return self._decoders.pop(key, None)

    def decoders(self) -> list[DecodeLoop | DecodeProcess]:
        return list(self._decoders.values())

    def codec(self, entry: ModelVersion) -> TextCodec:
        key = (entry.name, entry.version)
        if key not in self._codecs:
            self._codecs[key] = TextCodec(entry.manifest)
        return self._codecs[key]

    def model_label(self, name: str) -> str:
        """Metric label for a requested model name: unknown names collapse to one value; a
        call that names no model (ListModels, ReloadModels) gets none."""
        if not name:
            return ""
        return name if name in self.repository.models else "unknown"

    # -- use cases --------------------------------------------------------------------------
    def generate(
        self, model: str, version: str, params: GenerateParams, deadline: float | None
    ) -> tuple[str, AsyncIterator[Chunk]]:
        """The version that serves the stream (what an empty `version` resolved to: a client
        restarting the stream elsewhere must ask for it) and the stream's chunks."""
        entry = self.lookup(model, version, "Generate")
        key = (entry.name, entry.version)
        if key not in self._generators:
            self._generators[key] = Generator(
                entry, self.decoder(entry), self.limiter, self.signer, self.settings, self.metrics
            )
        return entry.version, self._generators[key].run(params, deadline)

    async def score(
        self, model: str, version: str, texts: list[str], top: int = 0
    ) -> list[ScoreResult]:
        entry = self.lookup(model, version, "Score")
        return await self.score_version(entry, self.codec(entry), texts, top)

    async def score_version(
        self, entry: ModelVersion, codec: TextCodec, texts: list[str], top: int = 0
    ) -> list[ScoreResult]:
        """Score on a version the caller resolved and holds (with its codec): one a reload
        removed since still scores, its session lives while held."""
        s = self.settings
        encoded = encode_texts(codec, texts, s.max_score_texts, s.max_prompt_tokens)
        return await self.score_encoded(entry, codec, encoded, top)

    async def score_encoded(
        self, entry: ModelVersion, codec: TextCodec, encoded: list[Encoded], top: int = 0
    ) -> list[ScoreResult]:
        """Score token ids read already (OpenAI logprobs add the reserved <eos>, which no
        text can bring) on a held version, in one --max-calls slot."""
        with self.calls.held():
            return await score(entry.model, self.runtime, codec, encoded, top)

    async def infill(
        self, model: str, version: str, left: str, right: str, top_k: int
    ) -> list[Candidate]:
        entry = self.lookup(model, version, "Infill")
        with self.calls.held():
            return await infill(
                entry, self.codec(entry), self.runtime, self.settings, left, right, top_k
            )

    async def forecast(
        self,
        model: str,
        version: str,
        history: list[float],
        horizon: int,
        fitted: bool,
        held: bool = False,
    ) -> ForecastResult:
        """`held`: the caller holds a --max-calls slot for a batch of these (KServe rows)."""
        entry = self.lookup(model, version, "Forecast")
        with contextlib.nullcontext() if held else self.calls.held():
            return await forecast(entry, self.runtime, self.settings, history, horizon, fitted)


def require(value: str, field: str) -> str:
    if not value:
        raise BadRequest(field, "is required")
    return value
