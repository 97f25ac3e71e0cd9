"""A differenced, seasonal forecaster served: Forecast answers in CO2 ppm, not differences.

Trains a tiny GRU on seasonal + first differences of weekly CO2, exports it with the
pipeline, starts a real gRPC server on it and checks that the RPC's forecast and fitted
values equal the trainer's own k-step predictions in series units.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve.trainer.forecast.evaluate import LevelForecaster, TorchForecaster
from rnnserve.trainer.forecast.pipeline import run_forecast
from rnnserve.trainer.forecast.series import load_csv, tail_split
from rnnserve.trainer.forecast.train import ForecastTrainConfig
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings

DATA = Path(__file__).resolve().parents[3] / "bench" / "data"


@pytest.mark.slow
def test_served_forecast_undoes_seasonal_and_first_differences(tmp_path: Path) -> None:
    values = load_csv(DATA / "co2.csv", "co2")[:400]
    series = tail_split(values, 4, "co2", val_size=16, transform="diff", season=52)
    config = ForecastTrainConfig(arch="gru", hidden=4, epochs=2, num_steps=32, rollout=4)
    run = run_forecast(config, series, out=tmp_path, name="co2-gru", log=lambda _: None)
    assert run.path is not None
    history = values[:300].astype(np.float64)
    want = LevelForecaster(TorchForecaster(run.model), series).k_step(
        history, np.array([len(history) - 1]), 20
    )[0]
    server = ServerThread(make_settings(tmp_path)).start()
    try:
        request = pb.ForecastRequest(
            model="co2-gru", history=history.tolist(), horizon=20, return_fitted=True
        )
        res = server.stub.Forecast(request)
        np.testing.assert_allclose(res.forecast, want, rtol=1e-5, atol=1e-3)
        assert 300 < res.forecast[0] < 400  # ppm, not a normalised difference
        assert res.fitted_offset == 52 + 1 + 1  # season + first difference + window 1
        one_step = LevelForecaster(TorchForecaster(run.model), series).k_step(
            history, np.arange(res.fitted_offset - 1, len(history) - 1), 1
        )[:, 0]
        np.testing.assert_allclose(res.fitted, one_step, rtol=1e-5, atol=1e-3)
        short = pb.ForecastRequest(model="co2-gru", history=history[:50].tolist(), horizon=2)
        with pytest.raises(grpc.RpcError) as err:  # a client error, not any failure
            server.stub.Forecast(short)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at least 54" in err.value.details()
    finally:
        server.stop()
