"""A scriptable in-process rnnserve server for client tests (real gRPC, fake models).

The fake echoes what it was asked in its answers (so tests compare against the request, not
hard-coded numbers), records every call and its metadata, and can be told to fail.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

VOCAB = "abcdefghijklmnopqrstuvwxyz "


@dataclass
class Script:
    """What the fake should do; reset between tests."""

    # method name -> status codes to answer with, one per call, before answering normally
    failures: dict[str, list[grpc.StatusCode]] = field(default_factory=dict)
    # Generate fails with this status after sending `fail_after` tokens
    stream_failure: grpc.StatusCode | None = None
    fail_after: int = 0
    # set to make every call wait (for deadline tests); the test sets it again to release
    hold: threading.Event | None = None
    # what ReloadModels reports as failed to load
    reload_failed: list[str] = field(default_factory=lambda: ["bad/1: no model.onnx"])


class Recorder:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.metadata: list[dict[str, str]] = []
        self.requests: list[object] = []
        self.script = Script()
        self.live_streams = 0  # Generate calls not ended yet (done, failed or cancelled)
        self._lock = threading.Lock()

    def stream_started(self, context: grpc.ServicerContext) -> None:
        def ended() -> None:
            with self._lock:
                self.live_streams -= 1

        with self._lock:
            self.live_streams += 1
        context.add_callback(ended)

    def enter(self, name: str, request: object, context: grpc.ServicerContext) -> None:
        self.calls[name] += 1
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.script.hold is not None:
            self.script.hold.wait(10)
        queue = self.script.failures.get(name)
        if queue:
            code = queue.pop(0)
            context.abort(code, f"scripted {code.name} for {name}")


class FakeInference(pb_grpc.InferenceServicer):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def ListModels(self, request, context):
        self.rec.enter("ListModels", request, context)
        return pb.ListModelsResponse(models=[model_info("lstm"), model_info("sine-gru")])

    def GetModel(self, request, context):
        self.rec.enter("GetModel", request, context)
        if request.model not in ("lstm", "sine-gru"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} not found")
        return model_info(request.model)

    def Generate(self, request, context):
        self.rec.stream_started(context)
        self.rec.enter("Generate", request, context)
        if request.model == "bilstm":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "bilstm cannot generate")
        # Continue the prompt (or the resumed state's text) with its reverse.
        source = request.state.decode() + request.prompt
        n = request.max_tokens or 8
        reverse = source[::-1]
        for i in range(n):  # built as sent: a test may ask for a stream it never reads out
            ch = reverse[i % len(reverse)]
            if self.rec.script.stream_failure is not None and i == self.rec.script.fail_after:
                context.abort(self.rec.script.stream_failure, "scripted stream failure")
            last = i == n - 1
            yield pb.GenerateResponse(
                text=ch,
                token_id=VOCAB.find(ch),
                token_ids=[VOCAB.find(ch)],
                logprob=-0.5,
                finish_reason=pb.FINISH_REASON_LENGTH if last else 0,
                state=(source + (reverse * n)[:n]).encode()
                if last and request.return_state
                else b"",
            )

    def Score(self, request, context):
        self.rec.enter("Score", request, context)
        results = [
            pb.ScoreResult(
                perplexity=float(len(t)),
                log_likelihood=-float(len(t) - 1),
                num_tokens=len(t) - 1,
                token_logprobs=[-1.0] * (len(t) - 1),
                unknown_tokens=sum(ch not in VOCAB for ch in t),
                tokens=list(t[1:]),
            )
            for t in request.texts
        ]
        return pb.ScoreResponse(results=results)

    def Infill(self, request, context):
        self.rec.enter("Infill", request, context)
        k = request.top_k or 5
        probs = [0.5**i for i in range(1, k + 1)]
        return pb.InfillResponse(
            candidates=[
                pb.InfillCandidate(text=VOCAB[i], token_id=i, probability=p)
                for i, p in enumerate(probs)
            ]
        )

    def Forecast(self, request, context):
        self.rec.enter("Forecast", request, context)
        if request.model == "lstm":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "lstm is a language model")
        last = request.history[-1]
        fitted = list(request.history[:-1]) if request.return_fitted else []
        forecast = [last + k for k in range(1, request.horizon + 1)]
        band = request.model == "sine-band"  # a model whose manifest has intervals
        return pb.ForecastResponse(
            forecast=forecast,
            fitted=fitted,
            fitted_offset=1 if fitted else 0,
            lower=[f - 0.5 * k for k, f in enumerate(forecast, start=1)] if band else [],
            upper=[f + k for k, f in enumerate(forecast, start=1)] if band else [],
        )


class FakeAdmin(pb_grpc.AdminServicer):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def ReloadModels(self, request, context):
        self.rec.enter("ReloadModels", request, context)
        return pb.ReloadModelsResponse(loaded=["gru/2"], failed=self.rec.script.reload_failed)


def model_info(name: str) -> pb.ModelInfo:
    forecast = name.startswith("sine")
    version = pb.VersionInfo(
        version="1",
        task="forecast" if forecast else "lm",
        architecture="gru" if forecast else "lstm",
        hyperparameters={"hidden": "32", "layers": "1"},
        vocab_size=0 if forecast else len(VOCAB) + 4,
        state=[pb.StateTensor(name="h", shape=[1, -1, 32], dtype="float32")],
        execution_provider="CPUExecutionProvider",
        metrics={"mse_k16": 0.25} if forecast else {"val_perplexity": 3.5},
        status="SERVING",
        rpcs=["Forecast"] if forecast else ["Generate", "Score", "Infill"],
        tokenizer="" if forecast else "char",
    )
    return pb.ModelInfo(name=name, default_version="1", versions=[version])


def start(
    credentials: grpc.ServerCredentials | None = None, port: int = 0
) -> tuple[grpc.Server, Recorder, int]:
    """Start the fake on 127.0.0.1:<port> (0: a free one); returns (server, recorder, port)."""
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_InferenceServicer_to_server(FakeInference(rec), server)
    pb_grpc.add_AdminServicer_to_server(FakeAdmin(rec), server)
    if credentials is None:
        port = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        port = server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    return server, rec, port
