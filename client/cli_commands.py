"""The rnn-client subcommands: each takes the client and parsed arguments, prints, returns 0.

Why: kept apart from argument parsing (cli.py) so each command reads top to bottom; errors are
raised as RnnServeError / ValueError and turned into exit codes in one place, cli.main.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from rnnserve.client.cli_format import shorten, table, to_json
from rnnserve.client.forecast_plot import has_interval, plot_forecast
from rnnserve.client.results import ForecastResult, ModelInfo
from rnnserve.client.series_csv import read_series
from rnnserve.client.sync_client import RnnClient


def cmd_generate(client: RnnClient, args: argparse.Namespace) -> int:
    state = _read_resume(args.resume_file)
    _check_resume_dir(args.resume_file)
    stream = client.generate(
        args.model,
        args.prompt or "",
        version=args.version,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or (),
        return_state=args.resume_file is not None,
        state=state,
        state_every=args.state_every,
        failover=args.failover,
        timeout=args.timeout if args.timeout is not None else float("inf"),
    )
    wrote = False
    try:
        with stream:
            for event in stream:
                if args.json:
                    print(to_json(event), flush=True)
                else:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                    wrote = wrote or bool(event.text)
    except (Exception, KeyboardInterrupt):
        if wrote:  # end the text's line: the error, or "interrupted", was glued to its end
            with contextlib.suppress(OSError):  # stdout may be the pipe that broke
                print(flush=True)
        raise
    if not args.json:
        print(flush=True)
    if args.resume_file is not None:
        if stream.state:
            _write_atomic(Path(args.resume_file), stream.state)
        else:
            print("warning: the server returned no resume state", file=sys.stderr)
    return 0


def _read_resume(path: str | None) -> bytes | None:
    if path is None or not Path(path).exists():
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read resume file {path}: {exc.strerror}") from None
    return data or None


def _check_resume_dir(path: str | None) -> None:
    """Refuse a resume file whose folder is missing before generating, not after."""
    if path is not None and not Path(path).parent.is_dir():
        raise ValueError(f"cannot write resume file {path}: no folder {Path(path).parent}")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file + rename, so an interrupted run never leaves half a state.
    An OSError becomes ValueError: one line and exit 64, like an unreadable resume file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ValueError(f"cannot write resume file {path}: {exc.strerror}") from None


def cmd_score(client: RnnClient, args: argparse.Namespace) -> int:
    results = client.score(args.model, args.texts, version=args.version, timeout=args.timeout)
    if args.json:
        rows = [{"text": t, **asdict(r)} for t, r in zip(args.texts, results, strict=False)]
        print(to_json(rows))
        return 0
    headers = ["perplexity", "log_likelihood", "tokens", "unknown", "text"]
    rows = [
        [r.perplexity, r.log_likelihood, r.num_tokens, r.unknown_tokens, shorten(t)]
        for t, r in zip(args.texts, results, strict=False)
    ]
    print(table(headers, rows))
    return 0


def cmd_infill(client: RnnClient, args: argparse.Namespace) -> int:
    candidates = client.infill(
        args.model,
        args.left,
        args.right,
        top_k=args.top_k,
        version=args.version,
        timeout=args.timeout,
    )
    if args.json:
        print(to_json(candidates))
        return 0
    rows = [[i, repr(c.text), c.token_id, c.probability] for i, c in enumerate(candidates, 1)]
    print(table(["rank", "token", "id", "probability"], rows))
    return 0


def cmd_forecast(client: RnnClient, args: argparse.Namespace) -> int:
    series = read_series(args.history_file, args.column)
    if args.plot and Path(args.plot).is_dir():  # it wrote FOLDER.png beside the folder
        example = Path(args.plot) / "forecast.png"
        raise ValueError(f"--plot {args.plot} is a folder; give a file name, e.g. {example}")
    result = client.forecast(
        args.model,
        series.values,
        args.horizon,
        return_fitted=args.fitted,
        version=args.version,
        timeout=args.timeout,
    )
    # printed before plotting: a plot that fails (a folder missing, no matplotlib) must not
    # lose the forecast already received
    if args.json:
        print(to_json({"column": series.column, **asdict(result)}))
    else:
        n = len(series.values)
        print(_forecast_table(n, result))
        if result.fitted:
            rows = [
                [i, series.values[i], f]
                for i, f in enumerate(result.fitted, start=result.fitted_offset)
                if i < n
            ]
            print()
            print(table(["index", "actual", "fitted"], rows))
    if args.plot:
        sys.stdout.flush()
        title = f"{args.model}: {series.column}, {args.horizon}-step forecast"
        plotted = plot_forecast(args.plot, series.values, result, title)
        print(f"plot written to {plotted}", file=sys.stderr)
    return 0


def _forecast_rows(n: int, forecast: tuple[float, ...]) -> list[list[object]]:
    return [[k, n - 1 + k, v] for k, v in enumerate(forecast, start=1)]


def _forecast_table(n: int, result: ForecastResult) -> str:
    """step, index, forecast; and each step's 90% interval when the model has one."""
    rows = _forecast_rows(n, result.forecast)
    if not has_interval(result):
        return table(["step", "index", "forecast"], rows)
    bands = zip(rows, result.lower, result.upper, strict=True)
    rows = [[*row, lo, hi] for row, lo, hi in bands]
    return table(["step", "index", "forecast", "lower", "upper"], rows)


def cmd_models(client: RnnClient, args: argparse.Namespace) -> int:
    models = client.list_models(timeout=args.timeout)
    if args.json:
        print(to_json(models))
        return 0
    rows = []
    for m in models:
        for v in m.versions:
            default = "*" if v.version == m.default_version else ""
            rpcs = ",".join(v.rpcs)
            rows.append([m.name, v.version + default, v.task, v.architecture, v.status, rpcs])
    print(table(["model", "version", "task", "arch", "status", "rpcs"], rows))
    return 0


def cmd_model(client: RnnClient, args: argparse.Namespace) -> int:
    info = client.get_model(args.name, args.version, timeout=args.timeout)
    print(to_json(info) if args.json else describe_model(info))
    return 0


def describe_model(info: ModelInfo) -> str:
    lines = [f"{info.name} (default version {info.default_version})"]
    for v in info.versions:
        status = v.status + (f": {v.status_reason}" if v.status_reason else "")
        lines += [
            f"  version {v.version}",
            f"    task          {v.task}",
            f"    architecture  {v.architecture}",
            f"    status        {status}",
            f"    rpcs          {', '.join(v.rpcs)}",
            f"    provider      {v.execution_provider}",
        ]
        if v.tokenizer:
            lines.append(f"    tokenizer     {v.tokenizer}, vocabulary {v.vocab_size}")
        for s in v.state:
            lines.append(f"    state         {s.name} {list(s.shape)} {s.dtype}")
        for key, value in sorted(v.hyperparameters.items()):
            lines.append(f"    hyper         {key} = {value}")
        for key, value in sorted(v.metrics.items()):
            lines.append(f"    metric        {key} = {value:.6g}")
    return "\n".join(lines)


EXIT_RELOAD_FAILED = 65  # sysexits EX_DATAERR: the server answered, the repository is at fault


def cmd_reload(client: RnnClient, args: argparse.Namespace) -> int:
    """Rescan the repository; exit 65 when a version failed to load, so a deploy script sees it."""
    result = client.reload_models(timeout=args.timeout)
    if args.json:
        print(to_json(result))
    else:
        for label, items in (("loaded", result.loaded), ("unloaded", result.unloaded)):
            print(f"{label}: {', '.join(items) or '-'}")
        for item in result.failed:
            print(f"failed: {item}")
    return EXIT_RELOAD_FAILED if result.failed else 0
