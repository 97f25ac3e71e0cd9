"""Generate: validate a request into plain parameters, then run it through the decode loop."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from rnnserve.server import tracing
from rnnserve.server.decode.limiter import StreamLimiter
from rnnserve.server.decode.loop import DecodeLoop
from rnnserve.server.decode.stream import Chunk, Stream
from rnnserve.server.errors import BadRequest, UnsupportedTask
from rnnserve.server.metrics import ABORTED, Metrics
from rnnserve.server.repository import ModelVersion
from rnnserve.server.resume import Progress, Resumed, StateSigner
from rnnserve.server.sampling import Sampler, SamplingParams
from rnnserve.server.settings import Settings
from rnnserve.server.stopping import StopChecker, validate_stop
from rnnserve.server.text import TextCodec

DEFAULT_MAX_TOKENS = 64  # what an unset max_tokens means, capped by --max-tokens


def default_max_tokens(limit: int) -> int:
    """An unset max_tokens: 64, or --max-tokens when that is lower (as vLLM clamps its
    default), so a server run with a small limit still answers requests that leave it out."""
    return min(DEFAULT_MAX_TOKENS, limit)


@dataclass
class GenerateParams:
    """A validated Generate request, free of protobuf."""

    prompt: str = ""
    max_tokens: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    return_state: bool = False
    state: bytes = b""
    state_every: int = 0  # a checkpoint (resume state) every this many tokens; 0 = none


def check_task(entry: ModelVersion, rpc: str) -> None:
    """FAILED_PRECONDITION with the reason when the model cannot serve `rpc`."""
    assert entry.manifest is not None
    if rpc in entry.rpcs:
        return
    m = entry.manifest
    if m.task == "infill":
        why = "it is bidirectional: it reads the text in both directions, so it cannot predict "
        why += "the next token (the future is unknown); use Infill"
    elif m.task == "forecast":
        why = "it is a time-series model; use Forecast"
    else:
        why = f"task {m.task!r} models answer {', '.join(entry.rpcs)}"
    raise UnsupportedTask(f"model {entry.name}/{entry.version} cannot serve {rpc}: {why}")


def check_continuation(p: GenerateParams, max_tokens: int, at: Progress) -> None:
    """A resume state with no new prompt continues its stream exactly, so the request must
    repeat the original's max_tokens, sampling and stop (INVALID_ARGUMENT naming the field
    otherwise); the count, random sequence and held-back text come from the state."""
    sampling = p.sampling
    same = {
        "max_tokens": (max_tokens, at.max_tokens),
        "sampling.temperature": (sampling.temperature, at.temperature),
        "sampling.top_k": (sampling.top_k, at.top_k),
        "sampling.top_p": (sampling.top_p, at.top_p),
        "stop": (tuple(p.stop), at.stop),
    }
    if sampling.seed is not None and not sampling.greedy:
        same["sampling.seed"] = (sampling.seed, at.seed)
    for name, (asked, original) in same.items():
        if asked != original:
            raise BadRequest(
                name,
                f"is {asked!r} but the stream this resume state continues had {original!r}: "
                "a continuation (state and no prompt) repeats the original request",
            )
    if at.tokens >= max_tokens:
        raise BadRequest("state", f"the stream already made all its {max_tokens} tokens")


class Generator:
    """Turns GenerateParams into a stream of Chunks for one model version."""

    def __init__(
        self,
        entry: ModelVersion,
        decoder: DecodeLoop,
        limiter: StreamLimiter,
        signer: StateSigner,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.entry = entry
        self.decoder = decoder
        self.limiter = limiter
        self.metrics = metrics
        self.signer = signer
        self.settings = settings
        self.codec = TextCodec(entry.manifest)

    def _validate(self, p: GenerateParams) -> tuple[list[int], Resumed | None, int]:
        s = self.settings
        max_tokens = p.max_tokens or default_max_tokens(s.max_tokens)
        if not 1 <= max_tokens <= s.max_tokens:  # only an explicit value can be out of range
            raise BadRequest("max_tokens", f"must be in [1, {s.max_tokens}], got {p.max_tokens}")
        if p.state_every < 0:
            raise BadRequest("state_every", f"must be 0 or more, got {p.state_every}")
        p.sampling.validate(len(self.codec))
        # stop strings in the form the model's text has (lower case, NFKC; at word level a
        # space before each token): "isn't." is streamed " isn ' t .", so as sent it never
        # matched; the checker, check_continuation and a checkpoint's Progress.stop all hold
        # this form
        p.stop = [
            self.codec.stop_form(s, f"stop[{i}]") for i, s in enumerate(validate_stop(p.stop))
        ]
        resumed = None
        if p.state:
            m = self.entry.manifest
            resumed = self.signer.verify(
                p.state, self.entry.name, self.entry.version, m.state, len(self.codec),
                weights=m.onnx_sha256,
            )  # fmt: skip
        ids = self.codec.encode(p.prompt, "prompt", s.max_prompt_tokens).ids if p.prompt else []
        if not ids and resumed is None:
            if p.prompt:  # text the tokenizer erases (spaces at word level, punctuation only)
                raise BadRequest("prompt", "has no token after tokenization (give text the "
                                 "model's tokenizer keeps, or a resume state)")  # fmt: skip
            raise BadRequest("prompt", "is empty (give a prompt, or a resume state)")
        if resumed is not None:
            ids = [resumed.last_token, *ids]
            if not p.prompt and resumed.progress is not None:
                # a checkpoint from a replica of an earlier release holds the stop strings as
                # sent; compared in the form this one matches them in
                at = resumed.progress
                stop = tuple(self.codec.stop_form(s, "stop") for s in at.stop)
                resumed.progress = replace(at, stop=stop)
                check_continuation(p, max_tokens, resumed.progress)
            else:
                resumed.progress = None  # a new prompt after the state: a new stream from it
        return ids, resumed, max_tokens

    async def run(self, p: GenerateParams, deadline: float | None) -> AsyncIterator[Chunk]:
        """Admits, hands the prompt to the decode loop, and yields messages until the stream
        ends; leaving (normally, by error or by cancellation) frees the slot."""
        started = time.perf_counter()
        ids, resumed, max_tokens = self._validate(p)
        entry, decoder = self.entry, self.decoder
        name = entry.name
        ttft = self.metrics.time_to_first_token.labels(model=name)
        span = tracing.current_span()  # every protocol's handler runs inside its RPC span

        def on_tokens(stream: Stream, times: list[float]) -> None:
            """Time to first token; the decode thread records the gaps between tokens."""
            if stream.tokens == 0:
                ttft.observe(times[0] - stream.started)
                span.add_event("first_token", {"prompt_tokens": len(ids)})

        signer = None
        weights = entry.manifest.onnx_sha256 if entry.manifest else ""
        if p.return_state or p.state_every:

            def signer(state, last_token, progress: Progress | None) -> bytes:
                return self.signer.sign(name, entry.version, state, last_token, progress,
                                        weights=weights)  # fmt: skip

        eos = self.codec.vocab.eos
        at = resumed.progress if resumed else None
        if at is None:
            sampler, stopper = Sampler(p.sampling), StopChecker(max_tokens, p.stop, eos)
        else:  # the same stream, continued: its random sequence, count and held-back text
            sampler = Sampler(p.sampling, seed=at.seed, used=at.uniforms)
            stopper = StopChecker(max_tokens, p.stop, eos, count=at.tokens, _held=at.held)
        stream = Stream(
            model=name,
            sampler=sampler,
            stopper=stopper,
            decode=self.codec.piece,
            signer=signer,
            started=started,
            deadline=deadline,
            on_tokens=on_tokens,
            state_every=p.state_every,
            end_state=p.return_state,
        )
        self.limiter.acquire()
        decoder.admit()
        span.add_event("admitted")
        self.metrics.prompt_tokens.labels(model=name).inc(len(ids))
        try:
            decoder.submit(stream, ids, resumed.state if resumed else None)
            while (chunk := await stream.buffer.next()) is not None:
                yield chunk
        finally:
            reason = stream.finish_reason or ABORTED  # cancelled, past its deadline, failed
            self.metrics.finished_streams.labels(name, reason).inc()
            span.add_event("finish", {"finish_reason": reason})
            stream.cancel()  # the decode thread drops it by its next step
            decoder.release()
            self.limiter.release()
