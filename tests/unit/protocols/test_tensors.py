"""KServe tensor wire forms (pure): raw, typed contents, JSON; and the input -> use case
choice."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from rnnserve.kserve import grpc_predict_v2_pb2 as pb
from rnnserve.server.decode.limiter import CallLimiter
from rnnserve.server.errors import BadRequest
from rnnserve.server.http.kserve_routes import parse_infer
from rnnserve.server.kserve import mapping
from rnnserve.server.kserve.tensors import (
    Tensor,
    from_contents,
    from_json,
    from_raw,
    refuse_sequence,
    to_json,
    to_raw,
)


def test_bytes_round_trip_through_the_binary_form() -> None:
    t = Tensor("text", "BYTES", [3], np.array([b"", b"ab", "é".encode()], dtype=object))
    raw = to_raw(t)
    assert raw[:4] == b"\x00\x00\x00\x00" and raw[4:8] == b"\x02\x00\x00\x00"
    back = from_raw("text", "BYTES", [3], raw)
    assert back.data.tolist() == t.data.tolist()
    assert to_json(back) == ["", "ab", "é"]


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT64", "INT32", "UINT8", "BOOL"])
def test_numbers_round_trip(datatype: str) -> None:
    values = [1, 0, 1, 1] if datatype == "BOOL" else [1, 2, 3, 4]
    data = np.array(values).astype(mapping_dtype(datatype))
    back = from_raw("x", datatype, [2, 2], to_raw(Tensor("x", datatype, [2, 2], data)))
    assert back.data.tolist() == data.tolist()


def mapping_dtype(datatype: str):
    from rnnserve.server.kserve.tensors import DTYPES

    return DTYPES[datatype]


def test_typed_contents_and_json() -> None:
    contents = pb.InferTensorContents(fp32_contents=[1.5, 2.5])
    assert from_contents("h", "FP32", [2], contents).data.tolist() == [1.5, 2.5]
    assert from_json("h", "FP32", [1, 2], [[1.0, 2.0]]).data.tolist() == [1.0, 2.0]
    assert from_json("t", "BYTES", [1], ["hi"]).data.tolist() == [b"hi"]
    assert from_json("k", "INT64", [2], [3, 4.0]).data.tolist() == [3, 4]  # integral: kept


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: from_raw("t", "BYTES", [1], b"\x05\x00\x00\x00ab"), "longer"),
        (lambda: from_raw("t", "BYTES", [1], b"\x05\x00"), "length"),
        (lambda: from_raw("x", "FP32", [2], b"\x00" * 5), "whole"),
        (lambda: from_raw("x", "FP32", [3], b"\x00" * 8), "needs 3"),
        (lambda: from_raw("x", "NOPE", [1], b""), "unknown datatype"),
        (lambda: from_json("x", "FP32", [-1], [1.0]), "dimensions must be in [0, 2^63 - 1]"),
        (lambda: from_json("x", "FP32", [1], ["a"]), "numbers"),
        (lambda: from_json("x", "BYTES", [1], [1]), "strings"),
        (lambda: from_json("x", "BOOL", [1], [1]), "true or false"),
        # ragged rows: numpy's "setting an array element with a sequence", or for BYTES
        # "must be strings", named neither the rows nor the shape
        (lambda: from_json("h", "FP32", [2, 2], [[1, 2, 3], [4]]), "rows of equal length"),
        (lambda: from_json("t", "BYTES", [2, 2], [["a", "b", "c"], ["d"]]), "equal length"),
        (lambda: from_json("h", "FP32", [1], [{"v": 1}]), "rows of equal length"),
        (lambda: from_json("k", "INT64", [1], [2.7]), "INT64 data must be integers"),
        (lambda: from_json("k", "UINT8", [1], [300]), "out of bounds"),
        (lambda: from_json("h", "FP32", [1], [1e39]), "within the range of FP32"),  # not inf
        # numpy says "Python int too large to convert to C long": the type is named
        (lambda: from_json("k", "INT64", [1], [2**63]), "within the range of INT64"),
        (lambda: from_json("k", "UINT64", [1], [2**64]), "within the range of UINT64"),
        (lambda: from_json("h", "FP64", [1], [10**400]), "within the range of FP64"),
        # int_contents is 32-bit: a value that does not fit INT8 is the client's error
        (
            lambda: from_contents("k", "INT8", [1], pb.InferTensorContents(int_contents=[1000])),
            "inputs[k].contents",
        ),
        (
            lambda: from_contents(
                "k", "UINT16", [1], pb.InferTensorContents(uint_contents=[70000])
            ),
            "out of bounds",
        ),
        # values in another type's field were "shape [2] needs 2 elements, got 0"
        (
            lambda: from_contents("h", "FP32", [2], pb.InferTensorContents(int64_contents=[1, 2])),
            "inputs[h].contents: FP32 values go in fp32_contents, not int64_contents",
        ),
    ],
)
def test_bad_tensors_name_the_input(call, words: str) -> None:
    with pytest.raises(BadRequest) as err:
        call()
    assert words in str(err.value)


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_a_shape_of_more_than_int64_elements_is_a_bad_request(datatype: str) -> None:
    """300 dims of 2^62 multiply to a 5,700-digit count: str() of it in the mismatch message
    raised ValueError (sys.get_int_max_str_digits), a 500; and 100k such dims took minutes
    to multiply out, holding the event loop."""
    data = ["a"] if datatype == "BYTES" else [1.0]
    with pytest.raises(BadRequest, match=r"inputs\[x\]\.shape: has more than 2\^63 - 1 el"):
        from_json("x", datatype, [2**62] * 300, data)
    with pytest.raises(BadRequest, match=r"more than 2\^63 - 1"):
        from_raw("x", datatype, [2**62] * 3000, b"\x01\x00\x00\x00a")
    assert from_json("x", "FP32", [0, 2**62, 2**62], []).size == 0  # no elements: fine


def test_bytes_beyond_the_shape_are_refused_before_splitting_them_all() -> None:
    raw = b"\x00\x00\x00\x00" * 10
    with pytest.raises(BadRequest, match=r"shape \[2\] needs 2 elements, the data holds more"):
        from_raw("t", "BYTES", [2], raw)
    assert from_raw("t", "BYTES", [2, 5], raw).data.tolist() == [b""] * 10


def test_rest_infer_bodies_nested_too_deep_are_bad_requests() -> None:
    """json.loads raises RecursionError (not ValueError) past ~1000 levels: it was a 500."""
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(BadRequest, match="nests arrays or objects too deeply"):
        parse_infer(deep, None)
    with pytest.raises(BadRequest, match="nests arrays or objects too deeply"):
        parse_infer(b'{"inputs": ' + deep + b"}", None)


def test_inputs_choose_the_use_case() -> None:
    def t(name: str) -> Tensor:
        return Tensor(name, "BYTES", [1], np.array([b"a"], dtype=object))

    assert mapping.choose({"text": t("text")}) is mapping.SCORE
    assert mapping.choose({"left": t("left"), "right": t("right")}) is mapping.INFILL
    with pytest.raises(BadRequest, match="also needs right"):
        mapping.choose({"left": t("left")})
    with pytest.raises(BadRequest, match="takes no extra"):
        mapping.choose({"text": t("text"), "extra": t("extra")})
    with pytest.raises(BadRequest, match="accepted"):
        mapping.choose({"prompt": t("prompt")})


def test_select_orders_and_refuses_unknown_outputs() -> None:
    outs = [Tensor(n, "FP64", [1], np.zeros(1)) for n in ("a", "b")]
    assert [o.name for o in mapping.select(outs, ["b", "a"])] == ["b", "a"]
    assert mapping.select(outs, []) == outs
    with pytest.raises(BadRequest, match="no output 'c'"):
        mapping.select(outs, ["c"])


class _ForecastEngine:
    """An Engine stand-in: forecast = last value + 1..horizon, interval +/- the step."""

    def __init__(self, intervals: bool = True, scale: float = 1.0) -> None:
        self.intervals, self.scale = intervals, scale
        self.settings = SimpleNamespace(max_score_texts=4)
        self.calls = CallLimiter(2)  # a batch of up to 4 rows takes one slot

    def lookup(self, model: str, version: str, rpc: str):
        return SimpleNamespace(version="1")

    async def forecast(self, model, version, history, horizon, fitted, held=False):
        steps = np.arange(1, horizon + 1, dtype=np.float64)
        out = history[-1] + steps * self.scale
        if not self.intervals:
            return SimpleNamespace(forecast=out.tolist(), lower=[], upper=[])
        return SimpleNamespace(
            forecast=out.tolist(), lower=(out - steps).tolist(), upper=(out + steps).tolist()
        )


def _forecast_inputs(rows: list[list[float]], horizon: int) -> list[Tensor]:
    history = np.array(rows, dtype="<f8")
    return [
        Tensor("history", "FP64", list(history.shape), history.reshape(-1)),
        Tensor("horizon", "INT64", [1], np.array([horizon], "<i8")),
    ]


def test_forecast_returns_its_interval_bounds() -> None:
    """lower / upper as the native Forecast's lower[] / upper[], shaped like the forecast."""
    inputs = _forecast_inputs([[1.0, 2.0], [10.0, 20.0]], 3)
    _, outs = asyncio.run(mapping.infer(_ForecastEngine(), "m", "", inputs))
    by_name = {t.name: t for t in outs}
    assert list(by_name) == ["forecast", "lower", "upper"]
    assert all(t.datatype == "FP32" and t.shape == [2, 3] for t in outs)
    assert by_name["forecast"].data.tolist() == [3, 4, 5, 21, 22, 23]
    assert by_name["lower"].data.tolist() == [2, 2, 2, 20, 20, 20]
    assert by_name["upper"].data.tolist() == [4, 6, 8, 22, 24, 26]
    assert [s.name for s in mapping.FORECAST.outputs] == ["forecast", "lower", "upper"]


def test_forecast_without_intervals_returns_only_the_forecast() -> None:
    inputs = _forecast_inputs([[1.0, 2.0]], 2)
    _, outs = asyncio.run(mapping.infer(_ForecastEngine(intervals=False), "m", "", inputs))
    assert [t.name for t in outs] == ["forecast"] and outs[0].shape == [1, 2]
    with pytest.raises(BadRequest, match="no output 'lower'"):
        mapping.select(outs, ["lower"])


def test_forecast_beyond_fp32_is_refused_not_infinite() -> None:
    # an FP64 history the model takes can forecast levels (or bounds) past FP32's 3.4e38
    inputs = _forecast_inputs([[0.0, 1.0], [3.0e38, 3.2e38]], 2)
    with pytest.raises(BadRequest, match=r"inputs\[history\]\[1\]: its forecast is beyond"):
        asyncio.run(mapping.infer(_ForecastEngine(scale=1e38), "m", "", inputs))


def test_a_forecast_batch_is_bounded_like_scores_texts() -> None:
    """One forecast per row: a 4 MB body of short rows was ~130k model calls in one request.
    At most --max-score-texts rows, as Score takes at most that many texts."""
    _, outs = asyncio.run(
        mapping.infer(_ForecastEngine(), "m", "", _forecast_inputs([[1.0]] * 4, 1))
    )
    assert outs[0].shape == [4, 1]
    with pytest.raises(BadRequest, match=r"inputs\[history\]: has 5 rows, more than the 4"):
        asyncio.run(mapping.infer(_ForecastEngine(), "m", "", _forecast_inputs([[1.0]] * 5, 1)))


@pytest.mark.parametrize(
    "params",
    [
        {"sequence_id": 7},
        {"sequence_id": "user-1"},
        {"sequence_start": True},
        {"sequence_id": 0, "sequence_end": True},
    ],
)
def test_sequence_batching_is_refused_not_ignored(params) -> None:
    with pytest.raises(BadRequest) as err:
        refuse_sequence(params)
    assert "sequence batching" in err.value.message and "parameters.sequence_" in str(err.value)


def test_no_sequence_passes() -> None:
    """tritonclient sends no sequence parameters unless asked; 0 / "" / false mean none."""
    for params in ({}, {"sequence_id": 0}, {"sequence_id": ""}, {"sequence_start": False}):
        refuse_sequence(params)


@pytest.mark.parametrize("length", [" 2", "+2", "2_0", "\u0662", "-1", "two", "", "1" * 4301])
def test_the_header_length_is_plain_decimal_digits(length: str) -> None:
    """int() took " 2", "+2", "2_0" and Arabic-Indic digits as lengths."""
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
        parse_infer(b'{"inputs": []}', length)
