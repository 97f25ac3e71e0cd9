"""`rnn-trainer package`: a model package from an ONNX graph exported elsewhere + its vocabulary.

Why: a user with a recurrent model trained by their own code should not need this trainer to
serve it. The graph's interface is named or inferred (trainer/graph_interface.py), fitted to
the contract at its edges (trainer/graph_adapt.py), checked like an export
(trainer/package_check.py) and published atomically (trainer/staging.py). A forecaster
(`--task forecast`) takes the same road through trainer/package_forecast.py, which shares
the loading, the source record and the publishing below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from rnnserve.artifact.manifest import ARCHITECTURES, ONNX_FILE, Manifest, sha256_file
from rnnserve.artifact.tokenizer import LEVELS, Tokenizer, TokenizerConfig
from rnnserve.artifact.vocab import EOS, RESERVED, UNK, Vocab
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
    """One token per line, line i = id i - 1 (a space is a line holding one space); or, for a
    `.json` file, a list of tokens by id or an object token -> id (vocab.json, `stoi`).

    Why JSON too: a token holding a line break (a char model's newline) cannot be a line, and
    vocabularies saved by other code are often JSON, which read as lines gave a misleading
    size mismatch.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM is no token
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainerError(f"cannot read the vocabulary {path}: {exc}") from exc
    if Path(path).suffix.lower() == ".json":
        return _json_vocab(path, text)
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
    return _enough(path, lines)


def _enough(path: Path, tokens: list[str]) -> list[str]:
    if len(tokens) < 2:
        raise TrainerError(f"vocabulary {path} has {len(tokens)} tokens; a model needs at least 2")
    return tokens


def _json_vocab(path: Path, text: str) -> list[str]:
    """A JSON list of tokens (index = id) or an object token -> id with ids 0..n-1."""
    expected = 'a JSON list of tokens by id (["<unk>", "the", ...]) or an object token -> id'
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TrainerError(
            f"vocabulary {path} is not valid JSON ({exc}); expected {expected} (or one token"
            " per line in a file not named .json)"
        ) from exc
    if isinstance(data, dict):
        by_id: dict[int, str] = {}
        for token, index in data.items():
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise TrainerError(f"vocabulary {path}: the id of {token!r} must be an integer"
                                   f" >= 0, got {index!r}")  # fmt: skip
            if index in by_id:
                raise TrainerError(f"vocabulary {path}: {token!r} and {by_id[index]!r} both have"
                                   f" id {index}")  # fmt: skip
            by_id[index] = token
        gap = next((i for i in range(len(by_id)) if i not in by_id), None)
        if gap is not None:
            raise TrainerError(f"vocabulary {path}: no token has id {gap}; ids must run 0 to"
                               f" {len(by_id) - 1} without gaps (the logits' columns)")  # fmt: skip
        data = [by_id[i] for i in range(len(by_id))]
    if not isinstance(data, list):
        raise TrainerError(f"vocabulary {path}: expected {expected}, got a JSON"
                           f" {type(data).__name__}")  # fmt: skip
    seen: dict[str, int] = {}
    for index, token in enumerate(data):
        if not isinstance(token, str) or token == "":
            raise TrainerError(f"vocabulary {path}: the token of id {index} must be a non-empty"
                               f" string, got {token!r}")  # fmt: skip
        if token in seen:
            raise TrainerError(f"vocabulary {path}: id {index} repeats {token!r} (first at id"
                               f" {seen[token]})")  # fmt: skip
        seen[token] = index
    return _enough(path, data)


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


def left_to_right(graph: onnx.GraphProto, unit: str = "token") -> None:
    """Refuses a bidirectional or reversed recurrent op: each of its steps reads later tokens
    (or values), which a server feeding one per call never has (the step check would fail
    with a number instead of the reason)."""
    for node in graph.node:
        if node.op_type not in RECURRENT_OPS:
            continue
        direction = next((a.s.decode() for a in node.attribute if a.name == "direction"), "")
        if direction in ("bidirectional", "reverse"):
            raise TrainerError(
                f"the graph does not fit: its {node.op_type} op {node.name!r} runs {direction}:"
                f" each step reads {unit}s after it, but the server runs left to right, one"
                f" {unit} per call; package a left-to-right model (bidirectional=False)"
            )


def source_record(path: Path, layout: str, inferred: list[str]) -> dict[str, Any]:
    """manifest.training's account of a packaged graph, either task: the file it came from,
    its digest, the layout it was read in and what was inferred."""
    return {
        "source_onnx": str(Path(path).resolve()),
        "source_sha256": sha256_file(Path(path)),
        "layout": layout,
        "inferred": inferred,
    }


def save_manifest(directory: Path, manifest: Manifest) -> None:
    """Writes manifest.json and reads it back as the server will: fail here, not there."""
    manifest.save(directory)
    Manifest.load(directory)


def load_graph(path: Path) -> onnx.ModelProto:
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
    model = load_graph(request.onnx_path)
    left_to_right(model.graph)
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
        try:
            parity = check_package_graph(onnx_path, iface, len(vocab), probe, source)
        except TrainerError as exc:  # pairs swapped by a guess fail here, not by their shape
            raise TrainerError(f"{exc}{iface.pair_hint()}") from exc
        layout = "time-major" if iface.time_major else "batch-major"
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
                **source_record(request.onnx_path, layout, iface.notes),
                "token_dtype": iface.input_dtype,  # int32: the server's int64 ids are cast
                "vocab_renumbered": mapping.to_graph is not None,
            },
            onnx_sha256=sha256_file(onnx_path),
            parity=parity,
        )
        save_manifest(tmp, manifest)
    request.notes[:] = [
        *iface.notes, *_unreachable_note(vocab, request.tokenizer), *_reserved_notes(graph_tokens)
    ]  # fmt: skip
    return target


# other spellings of <unk> and <eos> (torchtext, Hugging Face, GPT-2, fairseq): the server knows
# only its own, so unknown text would be fed as id 0 and Generate would never stop at them
UNK_LIKE = ("<UNK>", "[UNK]", "<oov>", "<OOV>", "<unknown>", "UNK")
EOS_LIKE = ("</s>", "<EOS>", "[EOS]", "<|endoftext|>", "<end>", "<END>", "<eot>", "[SEP]")


def _reserved_notes(graph_tokens: list[str]) -> list[str]:
    """Notes for a vocabulary without <unk> or <eos>: what the server does instead, and the
    line to rename when the vocabulary spells them another way."""
    notes = []
    if UNK not in graph_tokens:
        other = next((t for t in UNK_LIKE if t in graph_tokens), None)
        fix = f"; rename {other!r} to <unk> in the vocabulary to feed that" if other else ""
        notes.append(
            f"note: the vocabulary has no <unk>: a token it lacks is fed as id 0"
            f" ({graph_tokens[0]!r}) and scored as <unk>, which the model gives no probability"
            f" (log-probability -1e4){fix}"
        )
    if EOS not in graph_tokens:
        other = next((t for t in EOS_LIKE if t in graph_tokens), None)
        if other:
            notes.append(
                f"note: the vocabulary has no <eos>, so Generate never stops at {other!r}; rename"
                " it to <eos> in the vocabulary if it ends your texts"
            )
    return notes


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
