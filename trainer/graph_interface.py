"""Which inputs and outputs of a graph brought from elsewhere play which part for the server.

Why infer: a graph exported by someone else's code has its own names (`input`, `h0`, `hn`
...). The user may name the token input, the logits output and the state pairs; whatever
they leave out is inferred from dtypes, ranks, fixed sizes and symbolic axes when only one
reading fits, and otherwise the message says which tensor is in doubt and the flag to name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from rnnserve.artifact.manifest import StateSpec
from rnnserve.trainer.errors import TrainerError

DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}
# token ids the server can feed: it sends int64; an int32 input gets a Cast (graph_adapt.py)
TOKEN_DTYPES = ("int64", "int32")
Dim = int | str | None  # fixed size, symbolic name, or unknown


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # onnx type name, e.g. "float32", "int64", "int32"
    dims: tuple[Dim, ...]

    def describe(self) -> str:
        shown = ", ".join("?" if d is None else str(d) for d in self.dims)
        return f"{self.name} ({self.dtype} [{shown}])"


@dataclass
class GraphInterface:
    """The graph's parts in the server's terms; `time_major`: tokens [time, batch]."""

    input: str
    output: str
    states: list[StateSpec]
    time_major: bool = False
    notes: list[str] = field(default_factory=list)  # what was inferred, for the record
    input_dtype: str = "int64"  # the graph's own token dtype (one of TOKEN_DTYPES)
    guessed_pairs: bool = False  # some state input had several outputs its shape fits

    def pair_hint(self) -> str:
        """What to add to a failed step check when the state pairs were a guess."""
        if not self.guessed_pairs:
            return ""
        shown = ", ".join(f"{s.input}->{s.output}" for s in self.states)
        return (
            f"; the state pairs were inferred as {shown}: if another output carries an"
            " input's next state, name each pair with --state INPUT:OUTPUT"
        )


def misfit(detail: str) -> TrainerError:
    return TrainerError(f"the graph does not fit: {detail}")


def tensors(values) -> dict[str, Tensor]:
    out = {}
    for v in values:
        t = v.type.tensor_type
        dtype = DTYPES.get(t.elem_type) or onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        )
        out[v.name] = Tensor(v.name, dtype, dims)
    return out


def graph_inputs(graph: onnx.GraphProto) -> dict[str, Tensor]:
    """Real inputs (older exporters also list the weights as inputs)."""
    weights = {i.name for i in graph.initializer}
    return {k: v for k, v in tensors(graph.input).items() if k not in weights}


def listing(values: dict[str, Tensor]) -> str:
    return ", ".join(t.describe() for t in values.values()) or "none"


def _pick_input(inputs: dict[str, Tensor], name: str | None) -> Tensor:
    if name is not None:
        if name not in inputs:
            raise misfit(f"there is no input {name!r}; the inputs are {listing(inputs)}")
        chosen = inputs[name]
    else:
        found = [t for t in inputs.values() if t.dtype in TOKEN_DTYPES and len(t.dims) == 2]
        if len(found) != 1:
            some = "no int64 or int32 input" if not found else "several int64 or int32 inputs"
            values = [  # [batch, time(, 1)] both unfixed: a state has one unfixed axis
                t for t in inputs.values() if t.dtype == "float32" and len(t.dims) in (2, 3)
                and not any(isinstance(d, int) for d in t.dims[:2])
            ]  # fmt: skip
            if not found and values:  # --input would only move the refusal to its dtype
                raise misfit(
                    f"there is no token input ({some} of rank 2; the inputs are"
                    f" {listing(inputs)}); float values in, like {values[0].name}, make a"
                    " forecaster, and without --task `rnn-trainer package` makes language"
                    " models: package it with --task forecast and its normalisation"
                    " (docs/trainer.md)"
                )
            raise misfit(
                f"cannot tell the token input ({some} of rank 2); the inputs are"
                f" {listing(inputs)}; name it with --input"
            )
        chosen = found[0]
    if chosen.dtype not in TOKEN_DTYPES:
        raise misfit(f"token input {chosen.describe()} must hold int64 (or int32) token ids"
                     " (`rnn-trainer package` makes language models only)")  # fmt: skip
    if len(chosen.dims) != 2:
        raise misfit(f"token input {chosen.describe()} must have 2 axes: [batch, time]")
    return chosen


def _pick_output(outputs: dict[str, Tensor], name: str | None, vocab_size: int) -> Tensor:
    if name is not None:
        if name not in outputs:
            raise misfit(f"there is no output {name!r}; the outputs are {listing(outputs)}")
        chosen = outputs[name]
    else:
        scoring = [t for t in outputs.values() if t.dims and _fits(t.dims[-1], vocab_size)]
        found = [t for t in scoring if t.dtype == "float32" and len(t.dims) == 3]
        if not found and len(scoring) == 1:  # scores the vocabulary, not as the server reads
            found = scoring  # the checks below say what is wrong with it (dtype, axes)
        if not found:
            near = [  # [batch, time, fixed size]: a state has a fixed layers axis
                t for t in outputs.values() if t.dtype == "float32" and len(t.dims) == 3
                and not any(isinstance(d, int) for d in t.dims[:2])
            ]  # fmt: skip
            if len(near) == 1:  # --output would only restate it: say what is off, and by how much
                size = near[0].dims[2]
                off = f"{abs(size - vocab_size)} {'more' if size > vocab_size else 'fewer'}"
                raise misfit(
                    f"no output scores {vocab_size} tokens per step, the vocabulary's size: the"
                    f" logits output {near[0].describe()} scores {size}, {off}; package the"
                    " vocabulary the model was trained with, one token per id (a space is a"
                    " line holding one space; a token holding a line break needs a .json"
                    " vocabulary)"
                )
            raise misfit(
                f"no output scores {vocab_size} tokens per step, the vocabulary's size (the"
                f" outputs are {listing(outputs)}); is the vocabulary the one the model was"
                " trained with? If so, name the logits with --output"
            )
        if len(found) > 1:
            raise misfit(
                f"cannot tell the logits output: {listing({t.name: t for t in found})} all"
                " could be [batch, time, vocabulary]; name it with --output"
            )
        chosen = found[0]
    if chosen.dtype != "float32":
        raise misfit(f"logits output {chosen.describe()} must be float32")
    if len(chosen.dims) != 3:
        raise misfit(
            f"logits output {chosen.describe()} must have 3 axes, [batch, time, vocabulary];"
            " a flattened [batch*time, vocabulary] output cannot be split into streams"
        )
    if isinstance(chosen.dims[2], int) and chosen.dims[2] != vocab_size:
        raise misfit(
            f"logits output {chosen.describe()} scores {chosen.dims[2]} tokens per step but the"
            f" vocabulary has {vocab_size}"
        )
    return chosen


def _fits(dim: Dim, vocab_size: int) -> bool:
    """An axis that may be the vocabulary's: its size, or a size not fixed in the graph."""
    return not isinstance(dim, int) or dim == vocab_size


def parse_state(
    text: str, inputs: dict[str, Tensor], outputs: dict[str, Tensor]
) -> tuple[str, str, int | None]:
    """INPUT:OUTPUT[:AXIS]; names may hold colons themselves (tf2onnx's "h0:0"), so a split
    that names an input and an output of the graph wins over the plain one."""
    parts = text.split(":")
    fits = []
    for cut in range(1, len(parts)):
        for end in (len(parts), len(parts) - 1):
            i, o = ":".join(parts[:cut]), ":".join(parts[cut:end])
            tail = parts[end:]
            axis = _integer(tail[0]) if tail else None
            if i in inputs and o in outputs and (not tail or axis is not None):
                fits.append((i, o, axis))
    if len(fits) == 1:
        return fits[0]
    if len(fits) > 1:
        shown = ", ".join(f"{i}:{o}" for i, o, _ in fits)
        raise TrainerError(f"--state {text!r} reads as more than one pair ({shown}); rename"
                           " the tensors without colons")  # fmt: skip
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise TrainerError(f"--state {text!r}: expected INPUT:OUTPUT or INPUT:OUTPUT:BATCH_AXIS")
    try:
        axis = int(parts[2]) if len(parts) == 3 else None
    except ValueError as exc:
        raise TrainerError(f"--state {text!r}: BATCH_AXIS must be an integer") from exc
    return parts[0], parts[1], axis


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def same_layout(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or len(a.dims) != len(b.dims):
        return False
    return all(x == y for x, y in zip(a.dims, b.dims, strict=True) if isinstance(x, int))


def shared_run(a: str, b: str) -> int:
    """Length of the longest run of characters two names share (h0 ~ hn: 1, h0 ~ cn: 0)."""
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            k = 0
            while i + k < len(a) and j + k < len(b) and a[i + k] == b[j + k]:
                k += 1
            best = max(best, k)
    return best


def loose_layout(a: Tensor, b: Tensor) -> bool:
    """Same dtype and rank, and each size fixed in both is the same: an exporter leaves open
    sizes it cannot infer (a window's next state [batch, Slicewindow_out_dim_1])."""
    return (a.dtype, len(a.dims)) == (b.dtype, len(b.dims)) and all(
        x == y for x, y in zip(a.dims, b.dims, strict=True)
        if isinstance(x, int) and isinstance(y, int)
    )  # fmt: skip


def as_fed_back(inp: Tensor, out: Tensor) -> Tensor:
    """The state output read in its input's shape when it fits loosely: it is fed back as
    that input, and the run at batch 2 (check_interface) checks the shape it comes back in."""
    return Tensor(out.name, inp.dtype, inp.dims) if loose_layout(inp, out) else out


def pair_states(
    inputs: dict[str, Tensor], outputs: dict[str, Tensor], notes: list[str]
) -> tuple[list[tuple[Tensor, Tensor, int | None]], bool]:
    """Each remaining input with a remaining output of the same dtype and sizes (or, when
    none has them, a loose fit: sizes the exporter left open): of several, the one whose name
    shares the longest run with the input's (h0 -> hn, c0 -> cn whatever order the outputs
    come in), then the first in graph order (torch.onnx.export keeps it).

    Also returns whether any input had several outputs to choose from (a guess the step
    check may refute; its message then names --state)."""
    free = dict(outputs)
    pairs: list[tuple[Tensor, Tensor, int | None]] = []
    ambiguous = False
    for t in inputs.values():
        fits = [o for o in free.values() if same_layout(t, o)]
        fits = fits or [o for o in free.values() if loose_layout(t, o)]
        ambiguous = ambiguous or len(fits) > 1
        if not fits:
            raise misfit(
                f"state input {t.describe()} has no output of the same dtype and shape to read"
                f" the next state from (outputs left: {listing(free)}); a recurrent graph must"
                " return its state, or name the pair with --state INPUT:OUTPUT"
            )
        match = max(fits, key=lambda o: shared_run(t.name, o.name))  # the first of ties
        del free[match.name]
        pairs.append((t, as_fed_back(t, match), None))
    if pairs:
        notes.append(
            "state pairs inferred: " + ", ".join(f"{i.name}->{o.name}" for i, o, _ in pairs)
        )
    return pairs, ambiguous


def state_pairs(
    states: list[str] | None,
    inputs: dict[str, Tensor],
    outputs: dict[str, Tensor],
    fed: str,
    notes: list[str],
) -> tuple[list[tuple[Tensor, Tensor, int | None]], bool]:
    """The state pairs `--state` names (`states`), else those inferred (pair_states); and
    whether the inference had to choose among several outputs."""
    if states is None:
        return pair_states(inputs, outputs, notes)
    return named_pairs(states, inputs, outputs, fed), False


def named_pairs(
    states: list[str], inputs: dict[str, Tensor], outputs: dict[str, Tensor], fed: str
) -> list[tuple[Tensor, Tensor, int | None]]:
    """The pairs `--state INPUT:OUTPUT[:AXIS]` names, each input and output at most once,
    and every input left named by one: the server feeds only the `fed` input ("token",
    "values") and state."""
    pairs: list[tuple[Tensor, Tensor, int | None]] = []
    for text in states:
        i, o, axis = parse_state(text, inputs, outputs)
        if i not in inputs:
            raise misfit(f"--state {text!r}: no state input {i!r}; left: {listing(inputs)}")
        if o not in outputs:
            raise misfit(f"--state {text!r}: no output {o!r}; left: {listing(outputs)}")
        for taken in pairs:  # one tensor in two pairs would carry one state twice
            if i == taken[0].name or o == taken[1].name:
                both = i if i == taken[0].name else o
                raise misfit(f"--state {text!r}: {both!r} is already in the pair"
                             f" {taken[0].name}:{taken[1].name}")  # fmt: skip
        pairs.append((inputs[i], as_fed_back(inputs[i], outputs[o]), axis))
    unfed = sorted(set(inputs) - {i.name for i, _, _ in pairs})
    if unfed:
        feeds = "tokens" if fed == "token" else fed
        raise misfit(f"input {unfed[0]!r} is neither the {fed} input nor a state input; the"
                     f" server feeds only {feeds} and state")  # fmt: skip
    return pairs


def state_spec(inp: Tensor, out: Tensor, axis: int | None) -> StateSpec:
    if not same_layout(inp, out):
        raise misfit(f"state input {inp.describe()} and output {out.describe()} differ in dtype"
                     " or shape; the output is fed back as the next call's input")  # fmt: skip
    if inp.dtype not in ("float32", "int64"):
        raise misfit(f"state {inp.describe()} must be float32 or int64")
    symbolic = [i for i, d in enumerate(inp.dims) if not isinstance(d, int)]
    if axis is None:
        if len(symbolic) != 1:
            # a fixed batch axis is refused whatever --state says: only a re-export helps
            fix = (
                "no symbolic axis); export it with dynamic_axes naming its batch axis"
                if not symbolic
                else f"symbolic axes {symbolic}); name it with --state INPUT:OUTPUT:AXIS"
            )
            raise misfit(f"cannot tell the batch axis of state {inp.describe()} ({fix}")
        axis = symbolic[0]
    if not 0 <= axis < len(inp.dims):
        raise misfit(f"state {inp.describe()} has no axis {axis}")
    unsized = [i for i in symbolic if i != axis]
    if unsized:
        raise misfit(f"state {inp.describe()}: axis {unsized[0]} has no fixed size, and the"
                     " server must build a fresh state of the right shape")  # fmt: skip
    shape = [-1 if i == axis else int(d) for i, d in enumerate(inp.dims)]  # type: ignore[arg-type]
    init = 0 if inp.dtype == "int64" else 0.0
    return StateSpec(inp.name, inp.name, out.name, shape, axis, inp.dtype, init)


def _time_major(token: Tensor, states: list[StateSpec], inputs: dict[str, Tensor]) -> bool | None:
    """True/False when the token input shares its batch axis name with the states'."""
    names = {inputs[s.input].dims[s.batch_axis] for s in states}
    names.discard(None)
    first, second = token.dims
    if second in names and first not in names:
        return True
    if first in names and second not in names:
        return False
    return None


def resolve(
    graph: onnx.GraphProto,
    vocab_size: int,
    *,
    input_name: str | None = None,
    output_name: str | None = None,
    states: list[str] | None = None,
    layout: str | None = None,
) -> GraphInterface:
    """The interface, named by the user where given and inferred where not."""
    inputs, outputs = graph_inputs(graph), tensors(graph.output)
    notes: list[str] = []
    token = _pick_input(inputs, input_name)
    logits = _pick_output(outputs, output_name, vocab_size)
    rest_in = {k: v for k, v in inputs.items() if k != token.name}
    rest_out = {k: v for k, v in outputs.items() if k != logits.name}
    pairs, guessed = state_pairs(states, rest_in, rest_out, "token", notes)
    specs = [state_spec(i, o, axis) for i, o, axis in pairs]
    if layout is None:
        major = _time_major(token, specs, inputs)
        time_major = bool(major)
        if major is not None:
            notes.append(f"layout inferred: {'time-major' if major else 'batch-major'}")
    elif layout in ("batch-major", "time-major"):
        time_major = layout == "time-major"
    else:
        raise TrainerError(f"--layout must be batch-major or time-major, got {layout!r}")
    if token.dtype != "int64":
        notes.append(f"token input {token.name} is {token.dtype}: the server's int64 ids are cast")
    return GraphInterface(
        token.name, logits.name, specs, time_major, notes, token.dtype, guessed_pairs=guessed
    )
