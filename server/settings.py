"""Server settings: one typed dataclass, filled from flags or RNNSERVE_* environment variables.

Every flag `--some-flag` can also be given as `RNNSERVE_SOME_FLAG`; a flag on the command line
wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from rnnserve import add_version_flag

ENV_PREFIX = "RNNSERVE_"
MAX_WORKERS = 256  # a typo's guard; one a core is the useful most
# set by --workers in each worker's environment: the parent's pid (no flag reads it)
WORKERS_PARENT_ENV = "_RNNSERVE_WORKERS_PARENT"
# 2 GiB: 500 million float32 weights, far past any recurrent model's size; a broken or
# hostile URL repository (or a gzip body that expands) stops there, not at a full disk
DEFAULT_MAX_DOWNLOAD_BYTES = 2 * 1024**3


@dataclass
class Settings:
    """Everything the composition root needs; defaults are the documented ones."""

    model_repo: str | Path = "models"  # a folder, or a URL mirrored into model_cache
    model_cache: str = ""
    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 8000
    http_port: int = 8080
    providers: list[str] = field(default_factory=lambda: ["cpu"])
    intra_op_threads: int = 1
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048
    max_horizon: int = 1000
    max_history: int = 100_000
    max_score_texts: int = 64
    max_streams: int = 512
    max_calls: int = 512
    max_batch: int = 256
    prefill_chunk: int = 256
    prefill_batch: int = 4
    prefill_thread: int = 1
    stream_interval_us: int = 5000
    decode_head: int = 1
    decode_process: int = 0
    max_message_bytes: int = 4 * 1024 * 1024
    max_infill_vocab: int = 4096
    state_key: str = ""
    state_key_previous: str = ""
    state_max_age: float = 0.0
    grace: float = 10.0
    drain_delay: float = 0.0
    log_level: str = "INFO"
    executor_threads: int = 4
    tokens_file: str = ""
    admin_tokens_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    workers: int = 1
    reuse_port: int = 0
    poll_interval: float = 0.0
    auth_health: int = 0
    allow_empty_repo: int = 0
    otlp_endpoint: str = ""


# flag name -> (type, help). Kept next to the dataclass so --help documents every field.
_HELP: dict[str, tuple[type, str]] = {
    "model_repo": (
        str,
        "model repository: <dir>/<name>/<version>/{model.onnx,manifest.json}, or the same "
        "layout at an http(s):// or s3:// URL (the [remote] extra), mirrored into --model-cache "
        "at start and before every rescan",
    ),
    "model_cache": (
        str,
        "local folder a URL --model-repo is mirrored into; empty = "
        "$XDG_CACHE_HOME/rnnserve/models/<hash of the URL>",
    ),
    "max_download_bytes": (
        int,
        "most bytes a URL --model-repo sync may write for one model version (all its files, "
        "as written to disk, after any gzip decoding); a version over it is not cached and "
        "is retried at the next sync; 0 = no cap",
    ),
    "host": (str, "address to bind the gRPC server to"),
    "port": (int, "gRPC port (0 picks a free one, logged at start)"),
    "metrics_port": (
        int,
        "Prometheus /metrics (and /healthz, /readyz) HTTP port, on every IPv4 and IPv6 "
        "address; 0 disables the endpoint",
    ),
    "http_port": (
        int,
        "HTTP port for OpenAI-compatible /v1/completions and KServe v2 REST /v2/... (same "
        "engine, auth, TLS and limits as gRPC; docs/protocols.md); 0 disables it",
    ),
    "providers": (
        str,
        "comma list of ONNX Runtime execution providers in preference order, "
        "e.g. cuda,cpu; unavailable ones are skipped with a log line",
    ),
    "intra_op_threads": (int, "ONNX Runtime intra-op threads per session (0 = ORT default)"),
    "max_prompt_tokens": (int, "longest prompt / scored text / infill context, in tokens"),
    "max_tokens": (
        int,
        "largest max_tokens a Generate call may ask for (one that leaves it unset gets 64, "
        "or this limit when lower)",
    ),
    "max_horizon": (int, "largest Forecast horizon"),
    "max_history": (int, "longest Forecast history, in values"),
    "max_score_texts": (int, "most texts in one Score call"),
    "max_streams": (int, "concurrent Generate streams; past it RESOURCE_EXHAUSTED (no queue)"),
    "max_calls": (
        int,
        "concurrent Score, Infill and Forecast calls (any protocol); past it RESOURCE_EXHAUSTED "
        "(no queue)",
    ),
    "max_batch": (int, "most streams stepped by one ONNX Runtime call (1 disables batching)"),
    "prefill_chunk": (
        int,
        "most prompt tokens one prefill call feeds a stream; longer prompts prefill in chunks, "
        "so short prompts behind them wait at most one chunk",
    ),
    "prefill_batch": (
        int,
        "most prompts one prefill call advances together; more wait for the next call (every "
        "row's first token waits for the whole call, and prompts prefilled together finish "
        "together and return together: a convoy)",
    ),
    "prefill_thread": (
        int,
        "1: prompts prefill in a thread of their own, beside the decode steps (ORT releases "
        "the GIL, so both cores work); 0: between decode steps, in the decode thread",
    ),
    "stream_interval_us": (
        int,
        "microseconds a stream's tokens may wait to share one message with the tokens made "
        "after them (one gRPC message per token costs more than a decode step); 0 = every "
        "step's tokens are sent at once",
    ),
    "decode_process": (
        int,
        "1: each model version's decode steps run in a process of its own, so they and gRPC "
        "stop sharing one GIL (docs/serving.md); 0: threads in the server process",
    ),
    "decode_head": (
        int,
        "1: lm models pick decode-step tokens inside ONNX Runtime (a head appended to the "
        "graph at load, GIL released); 0: in numpy",
    ),
    "max_message_bytes": (
        int,
        "largest request accepted (gRPC message, HTTP body), in bytes; replies are not capped",
    ),
    "max_infill_vocab": (
        int,
        "largest vocabulary for which lm models answer Infill by scoring every candidate",
    ),
    "state_key": (str, "secret that signs resume tokens; empty = random per process"),
    "state_key_previous": (
        str,
        "comma list of earlier --state-key values still accepted for resume tokens (key "
        "rotation: new tokens are signed with --state-key only)",
    ),
    "state_max_age": (
        float,
        "seconds (at least 1, counted whole) a resume token stays valid after it was made "
        "(0 = forever); older tokens, tokens made more than 60 s in the future, and tokens "
        "from servers that predate this flag are refused with INVALID_ARGUMENT",
    ),
    "grace": (float, "seconds in-flight calls get to finish after SIGTERM"),
    "drain_delay": (
        float,
        "seconds between SIGTERM turning health NOT_SERVING and new calls being refused, "
        "so load balancers stop routing here first (the --grace period follows)",
    ),
    "log_level": (str, "DEBUG, INFO, WARNING or ERROR"),
    "executor_threads": (int, "threads that run ONNX Runtime off the event loop"),
    "tokens_file": (
        str,
        "file of bearer tokens, one per line; with it (or RNNSERVE_TOKENS=a,b) every "
        "rnnserve.v1 call needs 'authorization: Bearer <token>'",
    ),
    "admin_tokens_file": (
        str,
        "file of admin bearer tokens, one per line; with it (or RNNSERVE_ADMIN_TOKENS=a,b) "
        "rnnserve.v1.Admin calls need one of these (an inference token gets PERMISSION_DENIED); "
        "an admin token may also call inference. Without it any --tokens-file token may call "
        "Admin",
    ),
    "auth_health": (
        int,
        "1: health checks and reflection need a token too (default: open); needs a token "
        "(--tokens-file or RNNSERVE_TOKENS)",
    ),
    "tls_cert": (str, "server certificate PEM; with --tls-key turns on TLS"),
    "tls_key": (str, "server private key PEM"),
    "tls_client_ca": (str, "CA PEM that client certificates must chain to (mutual TLS)"),
    "workers": (
        int,
        "server processes sharing the gRPC port (SO_REUSEPORT), each loading every model: at "
        "most one a core pays; a parent process serves their merged metrics on --metrics-port",
    ),
    "reuse_port": (int, "1: bind with SO_REUSEPORT (set by --workers for its workers)"),
    "poll_interval": (
        float,
        "seconds between model repository rescans (0 = off; SIGHUP and Admin.ReloadModels "
        "always rescan)",
    ),
    "allow_empty_repo": (
        int,
        "1: overall health (and /readyz) is SERVING while the repository has no model at all "
        "(bootstrapping); by default it is NOT_SERVING until some model version serves",
    ),
    "otlp_endpoint": (
        str,
        "OpenTelemetry OTLP/gRPC collector, e.g. http://otel-collector:4317: one trace span "
        "per RPC is exported there (needs the [otel] extra); empty = tracing off",
    ),
}


# 0/1 flags (int, so RNNSERVE_X=1 reads as it does on the command line)
SWITCHES = (
    "prefill_thread",
    "decode_head",
    "decode_process",
    "reuse_port",
    "auth_health",
    "allow_empty_repo",
)

# never echoed by --help, even when set in the environment
_SECRET = {"state_key", "state_key_previous"}


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def build_parser() -> argparse.ArgumentParser:
    """The rnn-server argument parser; defaults come from the environment, then the dataclass."""
    parser = argparse.ArgumentParser(
        prog="rnn-server",
        description="Serve exported recurrent models over gRPC (rnnserve.v1.Inference). "
        f"Every flag can also be set as an environment variable {ENV_PREFIX}<FLAG>.",
    )
    add_version_flag(parser)
    defaults = Settings()
    for f in fields(Settings):
        kind, text = _HELP[f.name]
        default = getattr(defaults, f.name)
        if isinstance(default, list):
            default = ",".join(default)
        env = _env_name(f.name)
        shown = "" if f.name in _SECRET else f"; default {default}"
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=_reader(kind, env),
            default=os.environ.get(env, default),
            help=f"{text} (env {env}{shown})",
        )
    return parser


def _reader(kind: type, env: str):
    """argparse's type for a flag: its error names the environment variable when the bad text
    came from there (argparse alone blames the flag, which the user never typed)."""

    def read(text: str):
        try:
            return kind(text)
        except ValueError:
            source = f" (from {env})" if os.environ.get(env) == text else ""
            raise argparse.ArgumentTypeError(
                f"cannot read {text!r} as {kind.__name__}{source}"
            ) from None

    read.__name__ = kind.__name__
    return read


def settings_from_args(argv: list[str] | None = None) -> Settings:
    """Parses flags (and the environment) into Settings; bad values exit with a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {}
    for f in fields(Settings):
        kind, _ = _HELP[f.name]
        raw = getattr(args, f.name)
        try:
            values[f.name] = kind(raw) if not isinstance(raw, kind) else raw
        except (TypeError, ValueError):
            parser.error(f"--{f.name.replace('_', '-')}: cannot read {raw!r} as {kind.__name__}")
    names = (p.strip().lower() for p in str(values["providers"]).split(","))
    values["providers"] = [p for p in names if p]  # " , cpu": no nameless provider
    settings = Settings(**values)
    problem = validate(settings)
    if problem:
        parser.error(problem)
    return settings


def validate(settings: Settings) -> str | None:
    """Returns a one-line problem with the settings, or None."""
    positive = [
        "max_prompt_tokens",
        "max_tokens",
        "max_horizon",
        "max_history",
        "max_score_texts",
        "max_streams",
        "max_calls",
        "max_batch",
        "prefill_chunk",
        "prefill_batch",
        "max_message_bytes",
        "executor_threads",
        "workers",
    ]
    for name in positive:
        if getattr(settings, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if settings.workers > MAX_WORKERS:  # each loads every model: 2000 took the machine down
        return f"--workers must be at most {MAX_WORKERS} (each worker loads every model)"
    for name in ("port", "metrics_port", "http_port"):
        if not 0 <= getattr(settings, name) <= 65535:
            return f"--{name.replace('_', '-')} must be in 0..65535"
    # 0/1 switches: `--decode-process 4` reads like "4 processes" and meant 1
    for name in SWITCHES:
        if getattr(settings, name) not in (0, 1):
            return f"--{name.replace('_', '-')} must be 0 or 1, got {getattr(settings, name)}"
    if settings.stream_interval_us < 0:
        return "--stream-interval-us must be 0 or more"
    if settings.max_download_bytes < 0:
        return "--max-download-bytes must be 0 (no cap) or more"
    if settings.intra_op_threads < 0:
        return "--intra-op-threads must be 0 or more"
    if settings.max_message_bytes > 2**31 - 1:  # gRPC's channel options are C ints
        return "--max-message-bytes must be at most 2147483647"
    for name in ("poll_interval", "grace", "drain_delay", "state_max_age"):  # inf: wait forever
        value = getattr(settings, name)
        if not (math.isfinite(value) and value >= 0):
            return f"--{name.replace('_', '-')} must be a finite number of seconds, 0 or more"
    if 0 < settings.state_max_age < 1:  # tokens carry whole seconds: a fresh one looked old
        return "--state-max-age must be 0 (forever) or at least 1 (tokens record whole seconds)"
    if settings.state_key and not settings.state_key.strip():  # would sign with a random key
        return "--state-key is only whitespace"
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        return "--log-level must be DEBUG, INFO, WARNING or ERROR"
    # without a scheme the exporter would use TLS, and a plaintext collector gets no span
    scheme, sep, _ = settings.otlp_endpoint.partition("://")
    if settings.otlp_endpoint and not (sep and scheme.lower() in ("http", "https")):
        return (
            "--otlp-endpoint must start with http:// (plaintext) or https:// (TLS), e.g. "
            f"http://otel-collector:4317; got {settings.otlp_endpoint!r}"
        )
    return None
