"""The decode head: log-softmax and the choice of each row's next token, appended to an lm
graph at load time so one decode step is one ONNX Runtime call that returns tokens.

The three ways to choose (greedy, tempered, filtered: top-k/top-p) are branches of `If`
nodes, so ORT runs only the chosen one and one session (one copy of the weights) serves
decode steps as well as plain calls: every head input has a default (greedy), so Score and
Infill call the graph without them.

Why: in numpy, a step's log-softmax, tempering, top-k/top-p filter and inverse-CDF draw hold
the GIL for ~20 µs, time the event loop (sending the previous tokens) and the ORT thread then
wait on each other for; inside ORT the same work runs with the GIL released. The head follows
`server.sampling.filtered_rows` / `sample_rows` exactly — float64, ties ranked by id, the top
one always kept, one uniform per sampled row drawn in Python by that stream's own RNG — and
tests check that both give the same tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rnnserve.server.sampling import SamplingParams

log = logging.getLogger(__name__)

PREFIX = "rnnserve_head/"
TEMPERATURE = PREFIX + "temperature"  # [batch] float64; 0 = greedy
TOP_K = PREFIX + "top_k"  # [batch] int64; the vocabulary size = no top-k
TOP_P = PREFIX + "top_p"  # [batch] float64; >= 1 = no top-p
UNIFORM = PREFIX + "uniform"  # [batch] float64 in [0, 1); ignored for greedy rows
USE_GREEDY = PREFIX + "use_greedy"  # bool scalar, default True: the greedy branch
USE_FILTERED = PREFIX + "use_filtered"  # bool scalar, default False: tempered, not filtered
TOKEN = PREFIX + "token"  # [batch] int64: each row's next token
LOGPROB = PREFIX + "logprob"  # [batch] float32: its log-probability under the unfiltered model
# inside the branches, three ways:
GREEDY_TOKEN, GREEDY_LOGPROB = PREFIX + "greedy_token", PREFIX + "greedy_logprob"
TEMPERED_TOKEN, TEMPERED_LOGPROB = PREFIX + "tempered_token", PREFIX + "tempered_logprob"
FILTERED_TOKEN, FILTERED_LOGPROB = PREFIX + "filtered_token", PREFIX + "filtered_logprob"
OUTPUTS = {
    "greedy": (GREEDY_TOKEN, GREEDY_LOGPROB),  # every row greedy
    "tempered": (TEMPERED_TOKEN, TEMPERED_LOGPROB),  # no row uses top-k or top-p
    "filtered": (FILTERED_TOKEN, FILTERED_LOGPROB),
}

HEAD_INPUTS = {
    TEMPERATURE: TensorProto.DOUBLE,
    TOP_K: TensorProto.INT64,
    TOP_P: TensorProto.DOUBLE,
    UNIFORM: TensorProto.DOUBLE,
}

SHARED = {PREFIX + "logits", PREFIX + "lp"}  # computed once, outside the If branches
MIN_OPSET = 13  # Softmax over one axis, ReduceSum's axes as an input


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def attach(model: onnx.ModelProto, logits: str) -> onnx.ModelProto | None:
    """A copy of `model` with the head reading `logits` [batch, time, vocab] at the last time
    step and adding TOKEN and LOGPROB outputs, or None when the graph cannot take it (then
    numpy does the work)."""
    opset = default_opset(model)
    if opset < MIN_OPSET:
        log.info("opset %d < %d: decode steps pick tokens in numpy", opset, MIN_OPSET)
        return None
    out = next((o for o in model.graph.output if o.name == logits), None)
    if out is None or len(out.type.tensor_type.shape.dim) != 3:
        log.info("output %s is not [batch, time, vocab]: decode steps pick tokens in numpy", logits)
        return None
    taken = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    if any(name.startswith(PREFIX) for name in taken):
        return None
    nodes = _nodes(logits)
    shared = [n for n in nodes if set(n.output) & SHARED]
    sampled = helper.make_graph(
        [_if(USE_FILTERED, _branch(nodes, "filtered"), _branch(nodes, "tempered"), "sampled")],
        "sampled",
        [],
        _branch_outputs("sampled"),
    )
    head = onnx.ModelProto()
    head.CopyFrom(model)
    g = head.graph
    defaults = _defaults()
    g.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, ["batch"] if t.dims else [])
        for t in defaults
    )
    g.initializer.extend([*defaults, *_constants()])
    g.node.extend([*shared, _if(USE_GREEDY, _branch(nodes, "greedy"), sampled, "head")])
    g.node.append(helper.make_node("Identity", [PREFIX + "token.head"], [TOKEN], name=TOKEN))
    g.node.append(helper.make_node("Identity", [PREFIX + "logprob.head"], [LOGPROB], name=LOGPROB))
    g.output.extend([
        helper.make_tensor_value_info(TOKEN, TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info(LOGPROB, TensorProto.FLOAT, ["batch"]),
    ])  # fmt: skip
    onnx.checker.check_model(head)
    return head


def _defaults() -> list[TensorProto]:
    """Head inputs with defaults (graph inputs that are also initializers may be left out)."""
    return [
        numpy_helper.from_array(np.array(True), USE_GREEDY),
        numpy_helper.from_array(np.array(False), USE_FILTERED),
        numpy_helper.from_array(np.zeros(1, np.float64), TEMPERATURE),
        numpy_helper.from_array(np.zeros(1, np.int64), TOP_K),
        numpy_helper.from_array(np.zeros(1, np.float64), TOP_P),
        numpy_helper.from_array(np.zeros(1, np.float64), UNIFORM),
    ]


def _if(cond: str, then: onnx.GraphProto, other: onnx.GraphProto, tag: str) -> onnx.NodeProto:
    outputs = [f"{PREFIX}token.{tag}", f"{PREFIX}logprob.{tag}"]
    return helper.make_node(
        "If", [cond], outputs, name=f"{PREFIX}if.{tag}", then_branch=then, else_branch=other
    )


def _branch_outputs(tag: str) -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info(f"{PREFIX}token.{tag}", TensorProto.INT64, None),
        helper.make_tensor_value_info(f"{PREFIX}logprob.{tag}", TensorProto.FLOAT, None),
    ]


def _branch(nodes: list[onnx.NodeProto], kind: str) -> onnx.GraphProto:
    """The nodes one kind needs beyond the shared log-softmax, as an If branch. Names made
    inside get a `.kind` suffix (a model is single-assignment across all its subgraphs);
    outer names (inputs, constants, `lp`) are read as they are."""
    token, logprob = OUTPUTS[kind]
    used, _ = _pruned(nodes, {token, logprob})
    own = [n for n in used if not set(n.output) & SHARED]
    made = {o for n in own for o in n.output}

    def name(x: str) -> str:
        return f"{x}.{kind}" if x in made else x

    renamed = []
    for n in own:
        r = onnx.NodeProto()
        r.CopyFrom(n)
        r.name = name(n.output[0])
        del r.input[:], r.output[:]
        r.input.extend(name(i) for i in n.input)
        r.output.extend(name(o) for o in n.output)
        renamed.append(r)
    renamed.append(helper.make_node("Identity", [name(token)], [f"{PREFIX}token.{kind}"]))
    renamed.append(helper.make_node("Identity", [name(logprob)], [f"{PREFIX}logprob.{kind}"]))
    return helper.make_graph(renamed, kind, [], _branch_outputs(kind))


def _pruned(
    nodes: list[onnx.NodeProto], outputs: set[str]
) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes `outputs` depend on, and every name they read."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1], needed


def _constants() -> list[TensorProto]:
    def const(name: str, value, dtype) -> TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), PREFIX + name)

    return [
        const("last", -1, np.int64),  # scalar: the last time step
        const("axis1", [1], np.int64),
        const("one_index", 1, np.int64),
        const("zero_i", 0, np.int64),
        const("one_i", 1, np.int64),
        const("zero_d", 0.0, np.float64),
        const("one_d", 1.0, np.float64),
    ]


def _nodes(logits: str) -> list[onnx.NodeProto]:
    """The head's computation; comments give the numpy it mirrors (server/sampling.py).

    Three token outputs share this node list — greedy (argmax only), tempered (no filter:
    one softmax and one draw) and filtered (top-k/top-p: a sort, a mask and a renormalisation
    first); `attach` makes each an If branch of only the nodes it needs."""
    p = PREFIX

    def n(op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
        return helper.make_node(op, [i if i.startswith(p) else p + i for i in inputs],
                                [o if o.startswith(p) else p + o for o in outputs],
                                name=p + outputs[0].removeprefix(p), **attrs)  # fmt: skip

    def col(x: str) -> onnx.NodeProto:  # [batch] -> [batch, 1]
        return n("Unsqueeze", [x, "axis1"], [x.removeprefix(p) + "_col"])

    def draw(dist: str, token: str, logprob: str) -> list[onnx.NodeProto]:
        """Inverse CDF over `dist` (normalised, id order) with each row's uniform."""
        return [
            n("CumSum", [dist, "one_index"], [dist + "_cumulative"]),
            n("LessOrEqual", [dist + "_cumulative", "uniform_col"], [dist + "_below"]),
            n("Cast", [dist + "_below"], [dist + "_below_i"], to=TensorProto.INT64),
            n("ReduceSum", [dist + "_below_i", "axis1"], [dist + "_drawn"], keepdims=0),
            n("Greater", [dist, "zero_d"], [dist + "_possible"]),
            n("Cast", [dist + "_possible"], [dist + "_possible_f"], to=TensorProto.FLOAT),
            n(
                "ArgMax",
                [dist + "_possible_f"],
                [dist + "_last"],
                axis=1,
                keepdims=0,
                select_last_index=1,
            ),
            n("Min", [dist + "_drawn", dist + "_last"], [dist + "_sampled"]),  # past the total
            n("Where", ["is_greedy", "greedy", dist + "_sampled"], [token]),
            *pick_logprob(token, logprob),
        ]

    def pick_logprob(token: str, logprob: str) -> list[onnx.NodeProto]:
        return [
            n("Unsqueeze", [token, "axis1"], [token + "_col"]),
            n("GatherElements", ["lp", token + "_col"], [token + "_lp"], axis=1),
            n("Squeeze", [token + "_lp", "axis1"], [logprob]),
        ]

    return [
        helper.make_node(
            "Gather", [logits, p + "last"], [p + "logits"], axis=1, name=p + "logits"
        ),  # [batch, vocab]
        n("LogSoftmax", ["logits"], ["lp"], axis=1),  # log_softmax(logits)
        n("ArgMax", ["lp"], [GREEDY_TOKEN], axis=1, keepdims=0),  # ties: the lowest id
        n("Identity", [GREEDY_TOKEN], ["greedy"]),
        *pick_logprob(GREEDY_TOKEN, GREEDY_LOGPROB),
        n("Equal", [TEMPERATURE, "zero_d"], ["is_greedy"]),
        n("Where", ["is_greedy", "one_d", TEMPERATURE], ["temperature_safe"]),
        col("temperature_safe"),
        col(UNIFORM),
        n("Cast", ["lp"], ["lp64"], to=TensorProto.DOUBLE),
        # (logprobs - max) / temperature: shifted first, or a tiny temperature sends every
        # logprob to -inf and the softmax to nan; the max is the logprob at the argmax
        n("GatherElements", ["lp64", GREEDY_TOKEN + "_col"], ["lp64_max"], axis=1),
        n("Sub", ["lp64", "lp64_max"], ["lp64_shifted"]),
        n("Div", ["lp64_shifted", "temperature_safe_col"], ["z"]),
        n("Softmax", ["z"], ["probs"], axis=1),  # exp(z - max) / sum
        *draw("probs", TEMPERED_TOKEN, TEMPERED_LOGPROB),
        n("Shape", ["probs"], ["shape"]),
        n("Gather", ["shape", "axis1"], ["vocab_1d"], axis=0),  # [1]
        n("Gather", ["shape", "one_index"], ["vocab"], axis=0),  # scalar
        n("TopK", ["probs", "vocab_1d"], ["ranked", "order"], axis=1, largest=1, sorted=1),
        n("Range", ["zero_i", "vocab", "one_i"], ["rank"]),  # [vocab]
        n("CumSum", ["ranked", "one_index"], ["before"], exclusive=1),  # mass ranked ahead
        col(TOP_K),
        col(TOP_P),
        n("Less", ["rank", "top_k_col"], ["in_top_k"]),
        # top-p over what top-k kept, renormalised: before < top_p x (mass of the top k)
        n("Add", ["before", "ranked"], ["through"]),  # inclusive cumulative mass
        n("Sub", ["top_k_col", "one_i"], ["top_k_last"]),
        n("GatherElements", ["through", "top_k_last"], ["top_k_mass"], axis=1),
        n("Mul", ["top_p_col", "top_k_mass"], ["top_p_mass"]),
        n("Less", ["before", "top_p_mass"], ["in_top_p"]),
        n("Equal", ["rank", "zero_i"], ["is_top"]),
        n("Or", ["in_top_p", "is_top"], ["in_top_p_or_top"]),  # the top one always
        n("And", ["in_top_k", "in_top_p_or_top"], ["keep"]),
        n("Cast", ["keep"], ["keep_d"], to=TensorProto.DOUBLE),
        n("Mul", ["ranked", "keep_d"], ["kept_ranked"]),
        n("Mul", ["probs", "zero_d"], ["zeros"]),
        n("ScatterElements", ["zeros", "order", "kept_ranked"], ["kept"], axis=1),  # id order
        n("ReduceSum", ["kept", "axis1"], ["kept_total"], keepdims=1),
        n("Div", ["kept", "kept_total"], ["filtered"]),  # renormalised
        *draw("filtered", FILTERED_TOKEN, FILTERED_LOGPROB),
    ]


@dataclass(frozen=True)
class RowParams:
    """A batch's head inputs that stay fixed for a trip (the branch and its parameters)."""

    kind: str  # a key of OUTPUTS
    feeds: dict[str, np.ndarray]  # without UNIFORM, which changes every step

    @classmethod
    def of(cls, params: list[SamplingParams], vocab: int) -> RowParams:
        """The conventions of filtered_rows: top_k 0 = the whole vocabulary, top_p outside
        (0, 1) = off, temperature 0 = greedy."""
        temperature = np.array([p.temperature for p in params], dtype=np.float64)
        top_k = np.array([min(p.top_k or vocab, vocab) for p in params], dtype=np.int64)
        top_p = np.array([p.top_p if 0.0 < p.top_p < 1.0 else 2.0 for p in params], np.float64)
        if not temperature.any():
            return cls("greedy", {USE_GREEDY: np.array(True)})
        feeds = {USE_GREEDY: np.array(False), TEMPERATURE: temperature}
        if (top_k < vocab).any() or (top_p <= 1.0).any():
            feeds.update({USE_FILTERED: np.array(True), TOP_K: top_k, TOP_P: top_p})
            return cls("filtered", feeds)
        return cls("tempered", {**feeds, USE_FILTERED: np.array(False)})
