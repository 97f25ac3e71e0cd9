"""Fits a graph brought from elsewhere to the server's contract at its edges only.

Why in the graph: the server runs every package alike (tokens [batch, time] -> logits [batch,
time, vocab], int64 ids of a vocabulary that begins with the reserved tokens). A time-major
graph gets a Transpose on the tokens and on the logits; a vocabulary that does not begin with
<unk> <pad> <bos> <eos> is renumbered by a Gather on each side; int32 token ids get a Cast.
The user's weights and ops stay as they are, and the export checks then run on the graph the
server will run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rnnserve.artifact.vocab import RESERVED, UNK
from rnnserve.trainer.graph_interface import GraphInterface

MISSING_LOGIT = -1e4  # a reserved token the model has no id for: probability exp(-1e4) = 0
PREFIX = "rnnserve_adapt_"


@dataclass(frozen=True)
class VocabMap:
    """The packaged vocabulary and, when it differs, packaged id -> the graph's own id."""

    tokens: list[str]
    to_graph: list[int] | None  # None: the graph's ids are the packaged ids
    missing: list[int]  # packaged ids the graph has no token for (reserved ones it lacks)


def map_vocab(graph_tokens: list[str]) -> VocabMap:
    """Keeps the graph's order after the reserved tokens; an absent <unk> reads as the graph's
    <unk> if it has one, else its id 0."""
    if tuple(graph_tokens[: len(RESERVED)]) == RESERVED:
        return VocabMap(list(graph_tokens), None, [])
    index = {t: i for i, t in enumerate(graph_tokens)}
    tokens = [*RESERVED, *(t for t in graph_tokens if t not in RESERVED)]
    fallback = index.get(UNK, 0)
    to_graph = [index.get(t, fallback) for t in tokens]
    missing = [j for j, t in enumerate(tokens) if t not in index]
    return VocabMap(tokens, to_graph, missing)


def adapt(model: onnx.ModelProto, iface: GraphInterface, vocab: VocabMap) -> onnx.ModelProto:
    """A copy of `model` whose token input and logits output follow the contract."""
    cast = iface.input_dtype != "int64"
    if not iface.time_major and vocab.to_graph is None and not cast:
        return model
    out = copy.deepcopy(model)
    graph = out.graph
    _adapt_input(graph, iface.input, iface.time_major, vocab, cast)
    _adapt_output(graph, iface.output, iface.time_major, vocab)
    return out


def rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node input named `old` (also in subgraphs, which may read outer names)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                rename_uses(sub, old, new)


def swap_first_axes(value: onnx.ValueInfoProto) -> None:
    dims = value.type.tensor_type.shape.dim
    first, second = copy.deepcopy(dims[0]), copy.deepcopy(dims[1])
    dims[0].CopyFrom(second)
    dims[1].CopyFrom(first)


def _adapt_input(
    graph: onnx.GraphProto, name: str, time_major: bool, vocab: VocabMap, cast: bool
) -> None:
    inner = f"{PREFIX}in_{name}"  # "in_"/"out_": a tensor named "ids" must not meet ours
    rename_uses(graph, name, inner)
    nodes, current = [], name
    if vocab.to_graph is not None:
        table = numpy_helper.from_array(np.asarray(vocab.to_graph, np.int64), f"{PREFIX}ids_in")
        graph.initializer.append(table)
        nodes.append(helper.make_node("Gather", [table.name, current], [f"{PREFIX}ids"]))
        current = f"{PREFIX}ids"
    if time_major:
        nodes.append(helper.make_node("Transpose", [current], [f"{PREFIX}tokens_tb"], perm=[1, 0]))
        current = f"{PREFIX}tokens_tb"
    value = next(v for v in graph.input if v.name == name)
    if cast:  # the server sends int64 ids; the graph reads its own integer type
        own = value.type.tensor_type.elem_type
        nodes.append(helper.make_node("Cast", [current], [f"{PREFIX}tokens_own"], to=own))
        current = f"{PREFIX}tokens_own"
        value.type.tensor_type.elem_type = onnx.TensorProto.INT64
    nodes.append(helper.make_node("Identity", [current], [inner]))
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    if time_major:
        swap_first_axes(value)


def _adapt_output(graph: onnx.GraphProto, name: str, time_major: bool, vocab: VocabMap) -> None:
    inner = f"{PREFIX}out_{name}"
    for node in graph.node:
        for i, produced in enumerate(node.output):
            if produced == name:
                node.output[i] = inner
    rename_uses(graph, name, inner)
    stale = [v for v in graph.value_info if v.name == name]
    for v in stale:
        graph.value_info.remove(v)
    current = inner
    if time_major:
        graph.node.append(
            helper.make_node("Transpose", [current], [f"{PREFIX}logits_bt"], perm=[1, 0, 2])
        )
        current = f"{PREFIX}logits_bt"
    if vocab.to_graph is not None:
        table = numpy_helper.from_array(np.asarray(vocab.to_graph, np.int64), f"{PREFIX}ids_out")
        graph.initializer.append(table)
        graph.node.append(
            helper.make_node("Gather", [current, table.name], [f"{PREFIX}renumbered"], axis=2)
        )
        current = f"{PREFIX}renumbered"
        if vocab.missing:
            mask = np.zeros(len(vocab.tokens), np.float32)
            mask[vocab.missing] = MISSING_LOGIT
            graph.initializer.append(numpy_helper.from_array(mask, f"{PREFIX}missing"))
            graph.node.append(
                helper.make_node("Add", [current, f"{PREFIX}missing"], [f"{PREFIX}masked"])
            )
            current = f"{PREFIX}masked"
    graph.node.append(helper.make_node("Identity", [current], [name]))
    value = next(v for v in graph.output if v.name == name)
    if time_major:
        swap_first_axes(value)
    if vocab.to_graph is not None:
        last = value.type.tensor_type.shape.dim[2]
        last.Clear()
        last.dim_value = len(vocab.tokens)
