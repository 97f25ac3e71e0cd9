"""`rnn-trainer package`: a model package from an ONNX graph exported elsewhere + its vocabulary.

Why: a user with a recurrent model trained by their own code should not need this trainer to
serve it. The graph's interface is named or inferred (trainer/graph_interface.py), fitted to
the contract at its edges (trainer/graph_adapt.py), checked like an export
(trainer/package_check.py) and published atomically (trainer/staging.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from rnnserve.artifact.manifest import ARCHITECTURES, ONNX_FILE, Manifest, sha256_file
from rnnserve.artifact.tokenizer import LEVELS, Tokenizer, TokenizerConfig
from rnnserve.artifact.vocab import RESERVED, Vocab
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.graph_adapt import VocabMap, adapt, map_vocab
from rnnserve.trainer.graph_check import reduced_precision
from rnnserve.trainer.graph_interface import GraphInterface, resolve
from rnnserve.trainer.package_check import check_interface, check_package_graph
from rnnserve.trainer.staging import package_dir, staged

RECURRENT_OPS = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}


@dataclass
class PackageRequest:
    """What `rnn-trainer package` was asked; None means: infer it from the graph."""

    onnx_path: Path
    vocab_path: Path
    tokenizer: TokenizerConfig
    out: Path
    name: str
    version: str = "1"
    input_name: str | None = None
    output_name: str | None = None
    states: list[str] | None = None  # INPUT:OUTPUT[:BATCH_AXIS] each
    layout: str | None = None  # batch-major | time-major
    arch: str | None = None
    text: Path | None = None  # text of the kind the model serves, for the check
    notes: list[str] = field(default_factory=list)


def read_vocab(path: Path) -> list[str]:
    """One token per line, line i = id i - 1 (a space is a line holding one space)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM is no token
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainerError(f"cannot read the vocabulary {path}: {exc}") from exc
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    seen: dict[str, int] = {}
    for number, token in enumerate(lines, start=1):
        if token == "":
            raise TrainerError(f"vocabulary {path}: line {number} is empty (one token per line)")
        if token in seen:
            raise TrainerError(
                f"vocabulary {path}: line {number} repeats {token!r} (first on line {seen[token]})"
            )
        seen[token] = number
    if len(lines) < 2:
        raise TrainerError(f"vocabulary {path} has {len(lines)} tokens; a model needs at least 2")
    return lines


def tokenizer_spec(spec: str, lowercase: bool = True, letters_only: bool = False):
    """`char`, `word`, or a JSON file with TokenizerConfig's fields (docs/contracts.md).

    The file is read strictly: a misspelt key or "false" as a string would otherwise fall
    back to a default, and the server would split text unlike the model was trained on.
    """
    if spec in LEVELS:
        return TokenizerConfig(level=spec, lowercase=lowercase, letters_only=letters_only)
    try:
        data = json.loads(Path(spec).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise TrainerError(
            f"--tokenizer {spec!r}: expected char, word or a JSON file of tokenizer settings"
            f" ({exc})"
        ) from exc
    if not lowercase or letters_only:
        raise TrainerError(
            f"--tokenizer {spec!r}: --keep-case and --letters-only go with char or word; set"
            ' "lowercase" and "letters_only" in the JSON file instead'
        )
    fields = {"level": str, "lowercase": bool, "letters_only": bool}
    if not isinstance(data, dict):
        raise TrainerError(f"--tokenizer {spec!r}: expected a JSON object with {', '.join(fields)}")
    for key, value in data.items():
        if key not in fields:
            raise TrainerError(f"--tokenizer {spec!r}: unknown setting {key!r} (settings:"
                               f" {', '.join(fields)})")  # fmt: skip
        if not isinstance(value, fields[key]):
            raise TrainerError(f"--tokenizer {spec!r}: {key!r} must be a JSON"
                               f" {'string' if fields[key] is str else 'true or false'},"
                               f" got {value!r}")  # fmt: skip
    try:
        return TokenizerConfig.from_dict(data)
    except ValueError as exc:
        raise TrainerError(f"--tokenizer {spec!r}: {exc}") from exc


def architecture_of(graph: onnx.GraphProto, given: str | None) -> str:
    if given is not None:
        if given not in ARCHITECTURES:
            raise TrainerError(f"--arch {given!r} is not one of {', '.join(ARCHITECTURES)}")
        return given
    found = sorted({RECURRENT_OPS[n.op_type] for n in graph.node if n.op_type in RECURRENT_OPS})
    if len(found) != 1:
        why = "no LSTM, GRU or RNN op" if not found else f"ops of {', '.join(found)}"
        raise TrainerError(f"cannot tell the architecture ({why} in the graph); name it with"
                           f" --arch ({', '.join(ARCHITECTURES)})")  # fmt: skip
    return found[0]


def _load(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
    except FileNotFoundError as exc:
        raise TrainerError(f"no ONNX graph at {path}") from exc
    except Exception as exc:  # protobuf's DecodeError and friends
        raise TrainerError(f"{path} is not a readable ONNX graph: {exc}") from exc
    if not model.graph.node:  # an empty file or a bare GraphProto parses as an empty model
        raise TrainerError(
            f"{path} holds no ONNX model (no graph nodes); give the file torch.onnx.export"
            " (or onnx.save of a ModelProto) wrote"
        )
    reduced = reduced_precision(model.graph)
    if reduced:  # it was labelled fp32, or failed the fp32 check with a puzzling message
        raise TrainerError(
            f"{path} is already reduced ({reduced}); package the fp32 graph, with"
            " --precision int8|fp16 to reduce it (its checks compare against fp32)"
        )
    return model


def _probe(request: PackageRequest, vocab: Vocab) -> tuple[list[int] | None, str]:
    if request.text is None:
        return None, ""
    try:
        text = Path(request.text).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainerError(f"cannot read --text {request.text}: {exc}") from exc
    return vocab.encode(Tokenizer(request.tokenizer).tokenize(text)), f"{request.text}"


def package_model(request: PackageRequest) -> Path:
    """Writes OUT/NAME/VERSION/{model.onnx, manifest.json}; returns that directory.

    Raises TrainerError saying which input or output does not fit and why; nothing is left
    behind on failure.
    """
    target = package_dir(request.out, request.name, request.version)
    model = _load(request.onnx_path)
    graph_tokens = read_vocab(request.vocab_path)
    iface: GraphInterface = resolve(
        model.graph, len(graph_tokens), input_name=request.input_name,
        output_name=request.output_name, states=request.states, layout=request.layout,
    )  # fmt: skip
    arch = architecture_of(model.graph, request.arch)
    as_is = VocabMap(graph_tokens, None, [])
    layout_only = adapt(model, iface, as_is).SerializeToString()
    check_interface(model.graph, layout_only, iface, len(graph_tokens))
    mapping = map_vocab(graph_tokens)
    vocab = Vocab(mapping.tokens)
    probe, source = _probe(request, vocab)
    with staged(target) as tmp:
        onnx_path = tmp / ONNX_FILE
        onnx.save(adapt(model, iface, mapping), str(onnx_path))
        parity = check_package_graph(onnx_path, iface, len(vocab), probe, source)
        manifest = Manifest(
            name=request.name,
            version=request.version,
            task="lm",
            architecture=arch,
            hyperparameters={"vocab_size": len(vocab), "source": "onnx"},
            input_name=iface.input,
            output_name=iface.output,
            state=iface.states,
            tokenizer=request.tokenizer,
            vocab=vocab.to_list(),
            training={
                "source_onnx": str(Path(request.onnx_path).resolve()),
                "source_sha256": sha256_file(Path(request.onnx_path)),
                "layout": "time-major" if iface.time_major else "batch-major",
                "token_dtype": iface.input_dtype,  # int32: the server's int64 ids are cast
                "vocab_renumbered": mapping.to_graph is not None,
                "inferred": iface.notes,
            },
            onnx_sha256=sha256_file(onnx_path),
            parity=parity,
        )
        manifest.save(tmp)
        Manifest.load(tmp)  # what the server will do: fail here, not there
    request.notes[:] = [*iface.notes, *_unreachable_note(vocab, request.tokenizer)]
    return target


def _unreachable_note(vocab: Vocab, config: TokenizerConfig) -> list[str]:
    """A warning for vocabulary tokens the tokenizer can never produce ("The" when it
    lowercases, "new york" at word level): the model's scores for them are never used, and
    text containing them reaches the model as other tokens or <unk>."""
    tokenizer = Tokenizer(config)
    tokens = vocab.to_list()[len(RESERVED) :]
    never = [t for t in tokens if tokenizer.tokenize(t) != [t]]
    if not never:
        return []
    shown = ", ".join(repr(t) for t in never[:5]) + (", ..." if len(never) > 5 else "")
    return [
        f"note: {len(never)} of {len(tokens)} vocabulary tokens can never come out of the "
        f"tokenizer ({shown}); check --tokenizer, --keep-case and --letters-only"
    ]
