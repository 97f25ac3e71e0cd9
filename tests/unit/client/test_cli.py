"""rnn-client in-process against the fake server: output, JSON, resume files, exit codes."""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from rnnserve.client.cli import build_parser, main


@pytest.fixture
def cli(fake, capsys):
    _rec, address = fake

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--address", address, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_generate_writes_the_stream(cli, fake) -> None:
    code, out, err = cli("generate", "--model", "lstm", "--prompt", "abc", "--max-tokens", "4")
    assert (code, out, err) == (0, "cbac\n", "")
    req = fake[0].requests[-1]
    assert (req.prompt, req.max_tokens, req.return_state) == ("abc", 4, False)


def test_generate_sampling_flags_reach_the_server(cli, fake) -> None:
    args = ["--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3"]
    code, _, _ = cli("generate", "--model", "lstm", "--prompt", "a", *args, "--stop", "x")
    assert code == 0
    s = fake[0].requests[-1].sampling
    assert (round(s.temperature, 3), s.top_k, round(s.top_p, 3), s.seed) == (0.7, 5, 0.9, 3)
    assert list(fake[0].requests[-1].stop) == ["x"]


def test_generate_json_lines(cli) -> None:
    code, out, _ = cli(
        "generate", "--model", "lstm", "--prompt", "ab", "--max-tokens", "2", "--json"
    )
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [e["text"] for e in lines] == ["b", "a"]
    assert lines[-1]["finish_reason"] == "length"


def test_a_stream_that_fails_ends_its_line_before_the_error(cli, fake) -> None:
    """The partial text had no newline, so on a terminal the error line was glued to it."""
    fake[0].script.stream_failure = grpc.StatusCode.INTERNAL
    fake[0].script.fail_after = 2
    argv = ["generate", "--model", "lstm", "--prompt", "abc", "--max-tokens", "4"]
    code, out, err = cli(*argv, "--no-failover")
    assert (code, out) == (13, "cb\n")
    assert err.startswith("error: INTERNAL: ")
    fake[0].script.fail_after = 0  # nothing written: stdout stays empty
    assert cli(*argv, "--no-failover")[:2] == (13, "")


def test_resume_file_is_saved_then_continued(cli, fake, tmp_path) -> None:
    state = tmp_path / "state.bin"
    code, out, _ = cli(
        "generate",
        "--model",
        "lstm",
        "--prompt",
        "ab",
        "--max-tokens",
        "2",
        "--resume-file",
        str(state),
    )
    assert code == 0 and state.read_bytes() == b"abba"
    code, out, _ = cli(
        "generate", "--model", "lstm", "--max-tokens", "3", "--resume-file", str(state)
    )
    assert code == 0
    assert fake[0].requests[-1].state == b"abba"  # continued from the file
    assert out == "abb\n"
    assert state.read_bytes() == b"abbaabb"  # and saved again


def test_resume_file_in_a_missing_folder_exits_64_before_generating(cli, fake, tmp_path) -> None:
    state = tmp_path / "no-such-dir" / "state.bin"
    argv = ["generate", "--model", "lstm", "--prompt", "ab", "--resume-file", str(state)]
    code, out, err = cli(*argv)
    assert (code, out) == (64, "")
    [line] = err.splitlines()
    assert line.startswith("error: cannot write resume file ") and "no-such-dir" in line
    assert fake[0].calls["Generate"] == 0  # refused before any work


def test_resume_file_write_failure_exits_64_without_traceback(cli, tmp_path, monkeypatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    state = tmp_path / "state.bin"
    code, _, err = cli("generate", "--model", "lstm", "--prompt", "ab", "--resume-file", str(state))
    assert code == 64
    assert err.splitlines() == [f"error: cannot write resume file {state}: Permission denied"]
    assert not state.exists()


def test_score_table_and_json(cli) -> None:
    code, out, _ = cli("score", "--model", "lstm", "hello", "hi")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["perplexity", "log_likelihood", "tokens", "unknown", "text"]
    assert rows[0].split()[2:] == ["4", "0", "hello"]
    code, out, _ = cli("--json", "score", "--model", "lstm", "hello")
    [row] = json.loads(out)
    assert row["text"] == "hello" and row["num_tokens"] == 4


def test_json_flag_after_the_subcommand(cli) -> None:
    code, out, _ = cli("models", "--json")
    assert code == 0 and [m["name"] for m in json.loads(out)] == ["lstm", "sine-gru"]


def test_infill_models_model_reload(cli) -> None:
    code, out, _ = cli("infill", "--model", "lstm", "--left", "a", "--right", "c", "--top-k", "2")
    assert code == 0 and out.splitlines()[0].split() == ["rank", "token", "id", "probability"]
    assert len(out.splitlines()) == 3
    code, out, _ = cli("models")
    assert code == 0 and "sine-gru" in out and "Forecast" in out
    code, out, _ = cli("model", "lstm")
    assert code == 0 and "architecture  lstm" in out and "hidden = 32" in out
    code, out, _ = cli("reload")
    assert code == 65 and "loaded: gru/2" in out and "failed: bad/1" in out


def test_reload_exits_65_only_when_a_version_failed(cli, fake) -> None:
    code, out, _ = cli("reload", "--json")
    assert code == 65 and json.loads(out)["failed"] == ["bad/1: no model.onnx"]
    fake[0].script.reload_failed = []
    code, out, _ = cli("reload")
    assert code == 0 and "failed" not in out


def test_forecast_prints_and_plots(cli, tmp_path) -> None:
    csv = tmp_path / "h.csv"
    csv.write_text("t,value\n0,1.0\n1,2.0\n2,3.0\n")
    png = tmp_path / "out.png"
    code, out, err = cli(
        "forecast",
        "--model",
        "sine-gru",
        "--history-file",
        str(csv),
        "--horizon",
        "2",
        "--fitted",
        "--plot",
        str(png),
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["step", "index", "forecast"]
    assert lines[1].split() == ["1", "3", "4.0000"]
    assert "fitted" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = cli(
        "--json", "forecast", "--model", "sine-gru", "--history-file", str(csv), "--horizon", "1"
    )
    assert json.loads(out)["forecast"] == [4.0]


def test_a_plot_that_fails_keeps_the_forecast_it_came_after(cli, tmp_path) -> None:
    """The plot was drawn before the table was printed: a plot into a missing folder exited
    64 and lost the forecast the server had already answered."""
    csv = tmp_path / "h.csv"
    csv.write_text("value\n1.0\n2.0\n3.0\n")
    argv = ["--model", "sine-gru", "--history-file", str(csv), "--horizon", "2"]
    code, out, err = cli("forecast", *argv, "--plot", str(tmp_path / "gone" / "p.png"))
    assert code == 64 and "cannot write" in err
    assert out.splitlines()[0].split()[:3] == ["step", "index", "forecast"]


def test_a_plot_into_a_folder_is_refused_before_the_call(cli, fake, tmp_path) -> None:
    """`--plot out/` wrote out.png beside the folder (and named it only afterwards)."""
    csv = tmp_path / "h.csv"
    csv.write_text("value\n1.0\n2.0\n3.0\n")
    argv = ["--model", "sine-gru", "--history-file", str(csv), "--horizon", "2"]
    code, out, err = cli("forecast", *argv, "--plot", str(tmp_path))
    assert (code, out) == (64, "")
    [line] = err.splitlines()
    assert line.startswith("error: --plot ") and "is a folder" in line
    assert not (tmp_path.parent / f"{tmp_path.name}.png").exists()
    assert "Forecast" not in fake[0].calls


def test_table_cells_keep_small_and_large_values_readable() -> None:
    """Four fixed decimals showed 0.00123 and 0.00118 both as 0.0012, 4e-5 as 0.0000, and a
    value of 1e9 + 20 as 1e+09."""
    from rnnserve.client.cli_format import table

    rows = [[0.00123], [0.00118], [4e-5], [1_000_000_020.0], [3.14159], [0.0], [-2.5e-3]]
    cells = [line.strip() for line in table(["v"], rows).splitlines()[1:]]
    assert cells == ["0.00123", "0.00118", "4e-05", "1000000020.0000", "3.1416", "0.0000",
                     "-0.0025"]  # fmt: skip


def test_forecast_plot_without_an_extension_names_the_file_it_wrote(cli, tmp_path) -> None:
    """matplotlib adds ".png" to a name without an extension: `--plot out` wrote out.png
    while rnn-client said "plot written to out"."""
    csv = tmp_path / "h.csv"
    csv.write_text("t,value\n0,1.0\n1,2.0\n")
    argv = ["--model", "sine-gru", "--history-file", str(csv), "--horizon", "1"]
    code, _, err = cli("forecast", *argv, "--plot", str(tmp_path / "out"))
    assert code == 0, err
    assert err == f"plot written to {tmp_path / 'out.png'}\n"
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forecast_shows_and_draws_the_interval(cli, tmp_path, monkeypatch) -> None:
    """The server's 90% interval (lower/upper) reached only --json: the table and the plot
    showed the forecast alone."""
    from matplotlib.axes import Axes

    drawn: list[tuple[list[float], list[float], list[float]]] = []
    fill_between = Axes.fill_between

    def record(self, x, y1, y2, **kwargs):
        drawn.append((list(x), list(y1), list(y2)))
        return fill_between(self, x, y1, y2, **kwargs)

    monkeypatch.setattr(Axes, "fill_between", record)
    csv = tmp_path / "h.csv"
    csv.write_text("t,value\n0,1.0\n1,2.0\n2,3.0\n")
    png = tmp_path / "out.png"
    argv = ["--history-file", str(csv), "--horizon", "2", "--plot", str(png)]
    code, out, err = cli("forecast", "--model", "sine-band", *argv)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["step", "index", "forecast", "lower", "upper"]
    assert lines[2].split() == ["2", "4", "5.0000", "4.0000", "7.0000"]
    assert drawn == [([3, 4], [3.5, 4.0], [5.0, 7.0])]  # steps after the history's last index
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn.clear()
    code, out, _ = cli("forecast", "--model", "sine-gru", *argv)  # a model without intervals
    assert code == 0 and out.splitlines()[0].split() == ["step", "index", "forecast"]
    assert drawn == []


@pytest.mark.parametrize(
    ("argv", "status", "exit_code"),
    [
        (["model", "nope"], "NOT_FOUND", 5),
        (["generate", "--model", "bilstm", "--prompt", "a"], "FAILED_PRECONDITION", 9),
        (["generate", "--model", "lstm"], "INVALID_ARGUMENT", 3),  # no prompt: refused locally
    ],
)
def test_errors_print_one_line_and_exit_with_the_status(cli, argv, status, exit_code) -> None:
    code, _, err = cli(*argv)
    assert code == exit_code
    [line] = err.splitlines()
    assert line.startswith(f"error: {status}: ")


def test_unavailable_after_retries_exits_14(cli, fake) -> None:
    fake[0].script.failures["ListModels"] = [grpc.StatusCode.UNAVAILABLE] * 10
    code, _, err = cli("models")
    assert code == 14 and err.startswith("error: UNAVAILABLE: ")


def test_token_from_environment(cli, fake, monkeypatch) -> None:
    monkeypatch.setenv("RNNSERVE_TOKEN", "envtok")
    assert cli("models")[0] == 0
    assert fake[0].metadata[-1]["authorization"] == "Bearer envtok"


def test_token_file_keeps_the_token_off_the_command_line(cli, fake, tmp_path, monkeypatch) -> None:
    """The first line, stripped (a BOM and CRLF too), before or after the subcommand; it
    wins over the env, as --token does."""
    monkeypatch.setenv("RNNSERVE_TOKEN", "envtok")
    secret = tmp_path / "token"
    secret.write_bytes(b"\xef\xbb\xbf  filetok \r\nsecond line\n")
    assert cli("--token-file", str(secret), "models")[0] == 0
    assert fake[0].metadata[-1]["authorization"] == "Bearer filetok"
    assert cli("models", "--token-file", str(secret))[0] == 0
    assert fake[0].metadata[-1]["authorization"] == "Bearer filetok"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read it (No such file or directory)"),
        (b"", "its first line is empty"),
        (b"\n  \ntoken-on-line-2\n", "its first line is empty"),
        (b"\xff\xfe", "cannot read it (not UTF-8 text)"),
    ],
)
def test_an_unusable_token_file_exits_64_naming_the_file(cli, fake, tmp_path, content, says):
    secret = tmp_path / "token"
    if content is not None:
        secret.write_bytes(content)
    code, _, err = cli("--token-file", str(secret), "models")
    [line] = err.splitlines()
    assert code == 64 and line.startswith(f"error: --token-file {secret}: {says}")
    assert not fake[0].metadata  # refused before any call


@pytest.mark.parametrize("order", ["before", "after"])
def test_token_and_token_file_are_mutually_exclusive(cli, fake, tmp_path, order) -> None:
    secret = tmp_path / "token"
    secret.write_text("filetok\n")
    argv = ["--token", "t", "models", "--token-file", str(secret)]
    if order == "before":
        argv = ["--token", "t", "--token-file", str(secret), "models"]
    code, _, err = cli(*argv)
    assert code == 64 and "--token and --token-file: give one of them" in err
    assert "filetok" not in err and not fake[0].metadata


@pytest.mark.parametrize(
    "argv",
    [
        ["score", "--model", "lstm"],  # no text
        ["bogus"],
        ["--timeout", "0", "models"],
        ["generate", "--model", "lstm", "--prompt", "a", "--max-tokens", "many"],
    ],
)
def test_usage_errors_exit_64_without_traceback(cli, argv) -> None:
    with pytest.raises(SystemExit) as info:
        cli(*argv)
    assert info.value.code == 64


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("http://localhost:50051", "is a URL"),  # was looked up as a host name: exit 14
        ("localhost", "is not host:port"),  # gRPC dialled port 443
        ("localhost:", "is not host:port"),
        (":50051", "is not host:port"),
        ("localhost:abc", "is not host:port"),
        ("localhost:50051,otherhost", "otherhost is not host:port"),
        ("::1", "[ADDRESS]:PORT"),
    ],
)
def test_an_address_that_is_not_host_port_is_bad_usage(fake, capsys, address, says) -> None:
    code = main(["--address", address, "models"])
    _, err = capsys.readouterr()
    assert code == 64
    [line] = err.splitlines()
    assert line.startswith("error: address: ") and says in line
    assert "ListModels" not in fake[0].calls


@pytest.mark.parametrize("form", ["{}", "dns:///{}", "ipv4:{}", "{},{}"])
def test_host_port_and_grpc_targets_are_accepted(fake, capsys, form) -> None:
    assert main(["--address", form.format(fake[1], fake[1]), "models"]) == 0


def test_a_misspelt_flag_gets_the_subcommand_usage_and_a_suggestion(capsys) -> None:
    """`generate --promt` was refused under the top-level usage, which lists no generate flag."""
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "lstm", "--promt", "hi"])
    err = capsys.readouterr().err
    assert info.value.code == 64
    assert err.startswith("usage: rnn-client generate ") and "--prompt PROMPT" in err
    assert (
        err.splitlines()[-1] == "error: unrecognized arguments: --promt hi (did you mean --prompt?)"
    )


@pytest.mark.parametrize(
    ("argv", "flag", "command"),
    [
        (["--no-failover", "generate", "--model", "m"], "--no-failover", "generate"),
        (["--model", "lstm", "generate", "--prompt", "a"], "--model", "generate"),
        (["--model=lstm", "generate", "--prompt", "a"], "--model", "generate"),
        (["--timeout", "5", "--max", "3", "generate", "--model", "m"], "--max-tokens", "generate"),
        (["--fitted", "forecast", "--model", "m", "--history-file", "h", "--horizon", "2"],
         "--fitted", "forecast"),
    ],
)  # fmt: skip
def test_a_subcommand_flag_before_the_subcommand_says_where_it_goes(capsys, argv, flag, command):
    """argparse said "unrecognized arguments: --no-failover (did you mean --no-failover?)",
    "invalid choice: 'lstm'" or "the following arguments are required: --model"."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 64
    assert err.startswith(f"usage: rnn-client {command} ")
    assert err.splitlines()[-1] == (
        f"error: {flag} is a flag of {command}: give it after the subcommand, "
        f"as in `rnn-client {command} {flag} ...`"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "--timeout", "5", "generate", "--model", "lstm", "--prompt", "abc"],
        ["--timeout=5", "--json", "score", "--model", "lstm", "ab"],
        ["--addr", "{address}", "models"],  # an abbreviated global flag, and its value
    ],
)
def test_global_flags_before_the_subcommand_still_work(fake, capsys, argv) -> None:
    address = fake[1]
    argv = [a.format(address=address) for a in argv]
    if "--addr" not in argv:
        argv = ["--address", address, *argv]
    assert main(argv) == 0, capsys.readouterr().err


def test_a_failed_tls_handshake_prints_one_line_not_grpc_log_lines(fake) -> None:
    """gRPC's C core wrote "I1201 ... Handshake failed ..." lines to stderr, one per attempt,
    around the `error:` line (`--tls` to a plaintext server, or an untrusted certificate)."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    argv = [sys.executable, "-m", "rnnserve.client.cli", "--address", fake[1], "--tls"]
    done = subprocess.run(
        [*argv, "--timeout", "10", "models"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 14
    [line] = done.stderr.splitlines()
    assert line.startswith("error: UNAVAILABLE: ") and "handshake" in line.lower()


def test_the_package_loads_its_names_when_used() -> None:
    """rnn-client can quiet grpc only if importing rnnserve.client loads no grpc itself."""
    import rnnserve.client as package

    assert sorted(package.__all__) == sorted(package._EXPORTS)
    for name, module in package._EXPORTS.items():
        assert getattr(package, name) is getattr(importlib.import_module(module), name)
    code = "import sys, rnnserve.client; assert 'grpc' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bad_csv_exits_64_with_the_reason(cli, tmp_path) -> None:
    csv = tmp_path / "h.csv"
    csv.write_text("value\n1\nx\n")
    code, _, err = cli(
        "forecast", "--model", "sine-gru", "--history-file", str(csv), "--horizon", "2"
    )
    assert code == 64 and "line 3" in err and "Traceback" not in err


class _RecordingStdout:
    """Records writes and flushes in order, to show each token is flushed as it arrives."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def write(self, text: str) -> int:
        self.log.append("w:" + text)
        return len(text)

    def flush(self) -> None:
        self.log.append("flush")

    def fileno(self) -> int:
        raise OSError("not a real file")


def test_generate_flushes_every_token(fake, monkeypatch) -> None:
    out = _RecordingStdout()
    monkeypatch.setattr("sys.stdout", out)
    code = main(
        [
            "--address",
            fake[1],
            "generate",
            "--model",
            "lstm",
            "--prompt",
            "abc",
            "--max-tokens",
            "3",
        ]
    )
    assert code == 0
    tokens = [i for i, entry in enumerate(out.log) if entry in ("w:c", "w:b", "w:a")]
    assert len(tokens) == 3
    assert all(out.log[i + 1] == "flush" for i in tokens)


def test_readme_lists_every_global_flag() -> None:
    """README's rnn-client section names each connection flag the parser accepts."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("### `rnn-client`", 1)[1].split("```sh", 1)[0]
    parser = build_parser()
    [group] = [g for g in parser._action_groups if g.title == "connection"]
    flags = {o for a in group._group_actions for o in a.option_strings}
    assert flags and not [f for f in sorted(flags) if f"`{f}" not in section]


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_terminal_that_is_not_utf8_gets_escapes_not_an_error(fake, monkeypatch, encoding) -> None:
    """A text the terminal's encoding cannot hold ended the command with UnicodeEncodeError,
    reported as exit 64 "bad usage"; now it is escaped as \\uXXXX: still valid JSON."""
    text = "héllo wörld € 😀"
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding=encoding)
    monkeypatch.setattr("sys.stdout", out)
    for flags in ([], ["--json"]):
        raw.seek(0)
        raw.truncate()
        assert main(["--address", fake[1], *flags, "score", "--model", "lstm", text]) == 0
        out.flush()
        printed = raw.getvalue().decode(encoding)
        if flags:
            [row] = json.loads(printed)
            assert row["text"] == text and "".join(row["tokens"]) == text[1:]
        else:
            assert "\\u20ac" in printed.splitlines()[1]


def test_json_output_is_strict_json_even_for_inf_and_nan() -> None:
    """The server answers perplexity inf past float range, and a manifest's metrics may be
    NaN: --json wrote the bare words Infinity and NaN, which jq and JSON.parse refuse."""
    from rnnserve.client.cli_format import to_json
    from rnnserve.client.results import ScoreResult

    def strict(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    result = ScoreResult(math.inf, -1e308, 3, 0, token_logprobs=(-math.inf, 0.5))
    row = json.loads(to_json([{"text": "x", "nan": math.nan}, result]), parse_constant=strict)
    assert row[0]["nan"] is None
    assert (row[1]["perplexity"], row[1]["token_logprobs"]) == (None, [None, 0.5])
