"""Drawing a forecast: the title is the user's own text (model and column names)."""

from __future__ import annotations

import pytest

from rnnserve.client.forecast_plot import plot_forecast
from rnnserve.client.results import ForecastResult

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "column", ["revenue ($M) vs cost ($M)", "cost_$^$", r"a$\x$b", "{x}$_$", "50% of $"]
)
def test_a_title_with_dollar_signs_is_drawn_as_written(tmp_path, monkeypatch, column) -> None:
    """matplotlib read "$...$" in the title as mathtext: a column named "revenue ($M) vs
    cost ($M)" came out as "revenue (M)vscost(M)", and "cost_$^$" raised a ValueError
    after the forecast had arrived, so rnn-client printed a parser trace instead of it."""
    from matplotlib.axes import Axes

    titles = []
    set_title = Axes.set_title

    def record(self, *args, **kwargs):
        titles.append(set_title(self, *args, **kwargs))
        return titles[-1]

    monkeypatch.setattr(Axes, "set_title", record)
    result = ForecastResult(forecast=(4.0, 5.0), lower=(3.5, 4.0), upper=(5.0, 7.0))
    title = f"m: {column}, 2-step forecast"
    written = plot_forecast(tmp_path / "out.png", [1.0, 2.0, 3.0], result, title)
    assert written.read_bytes()[:8] == PNG
    [text] = titles
    assert (text.get_text(), text.get_parse_math()) == (title, False)
