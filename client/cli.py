"""rnn-client: call an rnnserve server from the shell.

Why: one layer turns flags into a configured RnnClient and every failure into one line on
stderr and a documented exit code; the commands themselves live in cli_commands.py.

Exit codes: 0 success; a gRPC error exits with its status number (3 INVALID_ARGUMENT,
4 DEADLINE_EXCEEDED, 5 NOT_FOUND, 8 RESOURCE_EXHAUSTED, 9 FAILED_PRECONDITION, 13 INTERNAL,
14 UNAVAILABLE, 16 UNAUTHENTICATED, ...; see client/errors.py); 64 bad usage or unreadable
local input (flags, CSV, TLS, token or resume files); 65 `reload` answered but a version
failed to load; 130 interrupted.
"""

from __future__ import annotations

import os

# gRPC's C core writes its own log lines to stderr (a TLS handshake that fails: an "I1201
# 03:09:07 ... Handshake failed ..." line per attempt around the one `error:` line the command
# prints). It reads GRPC_VERBOSITY once, when grpc is imported; one set in the environment wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import difflib
import sys
from collections.abc import Sequence

from rnnserve import add_version_flag
from rnnserve.client import cli_commands as cmds
from rnnserve.client.cli_format import tolerate_any_stdout_encoding
from rnnserve.client.connection import DEFAULT_ADDRESS, TlsConfig, address_list
from rnnserve.client.errors import RnnServeError
from rnnserve.client.forecast_plot import PlotError
from rnnserve.client.series_csv import SeriesFileError
from rnnserve.client.sync_client import RnnClient

EXIT_USAGE = 64
EXIT_INTERRUPTED = 130
MODEL_HELP = "model name (`rnn-client models` lists them)"
DEFAULT_CLI_TIMEOUT = 30.0  # seconds per unary call; generate has no deadline unless given


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage; 2 is UNKNOWN here, so usage errors exit 64."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        """A flag no parser knows (`generate --promt`) was refused under the top-level usage,
        which lists no generate flag: the subcommand's usage, and the likely flag, instead."""
        misplaced = misplaced_flag(self, list(sys.argv[1:] if args is None else args))
        if misplaced is not None:
            sub, flag, command = misplaced
            sub.error(
                f"{flag} is a flag of {command}: give it after the subcommand, "
                f"as in `rnn-client {command} {flag} ...`"
            )
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser, message = unrecognized(self, parsed, extras)
            parser.error(message)
        return parsed


def misplaced_flag(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[argparse.ArgumentParser, str, str] | None:
    """(subcommand parser, flag, subcommand) for the first flag of the subcommand given before
    it (`rnn-client --no-failover generate ...`); None when there is none. argparse refused
    such a flag confusingly: "unrecognized arguments: --no-failover (did you mean
    --no-failover?)", "invalid choice: 'lstm'" for `--model lstm generate`, or "the following
    arguments are required: --model" for `--model=lstm generate`."""
    commands = next(
        (a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None
    )
    if not commands:
        return None
    skip, before = False, []
    for token in argv:
        if skip:
            skip = False
            continue
        if token == "--":
            return None
        if token in commands:
            sub = commands[token]
            for flag in before:
                action = _option(sub, flag)
                if action is not None:  # named in full: `--max` abbreviates --max-tokens
                    full = next(o for o in action.option_strings if o.startswith(flag))
                    return sub, full, token
            return None
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            action = _option(parser, name)
            if action is None:
                before.append(name)
            else:  # a global flag: its value (if it takes one and has no "=") is no command
                skip = action.nargs != 0 and "=" not in token
    return None


def _option(parser: argparse.ArgumentParser, name: str) -> argparse.Action | None:
    """The action `parser` runs for option `name`, spelt out or abbreviated as argparse
    allows (a prefix of one option only); None if it has none."""
    if name in parser._option_string_actions:
        return parser._option_string_actions[name]
    if not name.startswith("--"):
        return None
    actions = {a for o, a in parser._option_string_actions.items() if o.startswith(name)}
    return actions.pop() if len(actions) == 1 else None


def unrecognized(
    parser: argparse.ArgumentParser, parsed: argparse.Namespace, extras: list[str]
) -> tuple[argparse.ArgumentParser, str]:
    """The subcommand's parser and "unrecognized arguments: ... (did you mean --flag?)"."""
    sub = parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(parsed, action.dest, None) or "", parser)
    known = {o for a in (*parser._actions, *sub._actions) for o in a.option_strings}
    guesses = [
        match
        for extra in extras
        if extra.startswith("--")
        for match in difflib.get_close_matches(extra.split("=", 1)[0], sorted(known), n=1)
        if match != extra.split("=", 1)[0]  # a known flag in the wrong place: no typo to fix
    ]
    message = f"unrecognized arguments: {' '.join(extras)}"
    if guesses:
        message += f" (did you mean {', '.join(guesses)}?)"
    return sub, message


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Connection flags, accepted before or after the subcommand."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("connection")
    address = os.environ.get("RNNSERVE_ADDRESS", DEFAULT_ADDRESS)
    g.add_argument(
        "--address",
        default=default(address),
        help="host:port, or replicas as host:port,host:port: calls and generate streams move "
        f"to the next one when a replica fails (env RNNSERVE_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    g.add_argument(
        "--timeout",
        type=_positive_float,
        default=default(None),
        help=f"deadline in seconds per call (default {DEFAULT_CLI_TIMEOUT:g}; generate: none)",
    )
    g.add_argument(
        "--keepalive",
        type=_positive_float,
        default=default(None),
        help="seconds between pings during a call; a replica silent that long is left (failover)",
    )
    g.add_argument(
        "--token",
        default=default(None),
        help="bearer token (env RNNSERVE_TOKEN); process listings show it: prefer --token-file",
    )
    g.add_argument(
        "--token-file",
        metavar="PATH",
        default=default(None),
        help="read the bearer token from the file's first line",
    )
    g.add_argument("--tls", action="store_true", default=default(False), help="use TLS")
    g.add_argument("--tls-ca", default=default(None), help="root CA PEM (implies --tls)")
    g.add_argument("--tls-cert", default=default(None), help="client certificate PEM (mTLS)")
    g.add_argument("--tls-key", default=default(None), help="client key PEM (mTLS)")
    g.add_argument(
        "--tls-server-name", default=default(None), help="expected server name (implies --tls)"
    )
    g.add_argument("--json", action="store_true", default=default(False), help="JSON output")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnn-client", description="Call an rnnserve server.")
    add_version_flag(parser)
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _global_options(p, suppress=True)
        return p

    g = command("generate", "stream generated text to stdout")
    g.add_argument("--model", required=True, help=MODEL_HELP)
    g.add_argument("--version", default="", help="model version (default: the highest)")
    g.add_argument("--prompt", default="", help="text to warm up on")
    g.add_argument("--max-tokens", type=int, default=0, help="tokens to generate (0: 64)")
    g.add_argument(
        "--temperature", type=float, default=0.0, help="softmax temperature (default 0: greedy)"
    )
    g.add_argument(
        "--top-k", type=int, default=0, help="sample from the K likeliest tokens (default 0: off)"
    )
    g.add_argument(
        "--top-p", type=float, default=0.0,
        help="sample from the likeliest tokens whose probability reaches P (default 0: off)",
    )  # fmt: skip
    g.add_argument(
        "--seed", type=int, default=None,
        help="same seed, same text (default: a fresh random seed)",
    )  # fmt: skip
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--resume-file", help="continue from this state file, and save the new state")
    g.add_argument(
        "--state-every",
        type=int,
        default=None,
        help="tokens between checkpoints a failed-over stream continues from (default 64)",
    )
    g.add_argument(
        "--no-failover",
        dest="failover",
        action="store_false",
        help="end the stream when its replica fails instead of continuing on another",
    )
    g.set_defaults(func=cmds.cmd_generate)

    s = command("score", "perplexity of texts")
    s.add_argument("--model", required=True, help=MODEL_HELP)
    s.add_argument("--version", default="")
    s.add_argument("texts", nargs="+", metavar="TEXT")
    s.set_defaults(func=cmds.cmd_score)

    i = command("infill", "rank candidates for one blank token")
    i.add_argument("--model", required=True, help=MODEL_HELP)
    i.add_argument("--version", default="")
    i.add_argument("--left", default="", help="text before the blank")
    i.add_argument("--right", default="", help="text after the blank")
    i.add_argument("--top-k", type=int, default=0, help="candidates to show (0: 5)")
    i.set_defaults(func=cmds.cmd_infill)

    f = command("forecast", "continue a time series from a CSV file")
    f.add_argument("--model", required=True, help=MODEL_HELP)
    f.add_argument("--version", default="")
    f.add_argument(
        "--history-file", required=True, metavar="FILE.csv",
        help="the series so far: a CSV column of numbers, the header row optional",
    )  # fmt: skip
    f.add_argument("--column", help="header name or 0-based index (default: the last column)")
    f.add_argument("--horizon", type=int, required=True, help="values to predict")
    f.add_argument("--fitted", action="store_true", help="also show one-step fitted values")
    f.add_argument("--plot", metavar="OUT.png", help="draw history and forecast")
    f.set_defaults(func=cmds.cmd_forecast)

    m = command("models", "list models")
    m.set_defaults(func=cmds.cmd_models)

    d = command("model", "describe one model")
    d.add_argument("name")
    d.add_argument("--version", default="")
    d.set_defaults(func=cmds.cmd_model)

    r = command("reload", "rescan the server's model repository (Admin)")
    r.set_defaults(func=cmds.cmd_reload)
    return parser


#: gRPC's own target schemes (README: `dns:///host:port`), passed to it untouched.
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def check_address(address: str) -> None:
    """Refuse an --address gRPC would misread, as bad usage (64) naming the fix: a URL
    (`http://host:port` was looked up as a host name: UNAVAILABLE, 14), or a host without
    a port (gRPC dials 443, not the server's 50051)."""
    for item in address_list(address):
        if item.startswith(_GRPC_SCHEMES):
            continue
        if "://" in item:
            raise ValueError(f"address: {item} is a URL; give host:port, e.g. localhost:50051")
        if item.startswith("["):  # [v6]:port
            host, _, port = item[1:].partition("]")
            port = port.removeprefix(":")
        elif item.count(":") == 1:
            host, _, port = item.partition(":")
        elif ":" in item:
            raise ValueError(f"address: write an IPv6 address as [ADDRESS]:PORT, not {item}")
        else:
            host, port = item, ""
        if not host or not port.isdigit():
            raise ValueError(f"address: {item} is not host:port, e.g. localhost:50051")


def read_token_file(path: str) -> str:
    """The token on the first line of `path`, stripped (a trailing newline, CRLF or a
    byte-order mark is no part of it). ValueError naming the file, never the token, when it
    cannot be read or the line is empty."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            line = file.readline(64 * 1024)  # a token is short; a wrong path may be huge
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ValueError(f"--token-file {path}: cannot read it ({why})") from None
    token = line.strip()
    if not token:
        raise ValueError(f"--token-file {path}: its first line is empty; write the token there")
    return token


def resolve_token(args: argparse.Namespace) -> str | None:
    """--token or --token-file (not both), else env RNNSERVE_TOKEN. Checked after parsing:
    the flags may stand on either side of the subcommand, where argparse's mutually
    exclusive groups do not see each other."""
    if args.token is not None and args.token_file is not None:
        raise ValueError("--token and --token-file: give one of them")
    if args.token_file is not None:
        return read_token_file(args.token_file)
    return args.token if args.token is not None else os.environ.get("RNNSERVE_TOKEN")


def make_client(args: argparse.Namespace) -> RnnClient:
    check_address(args.address)
    token = resolve_token(args)
    tls = None
    # any TLS setting means TLS: dialling plaintext would ignore it and end in "Socket closed"
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        tls = TlsConfig.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return RnnClient(
        args.address, timeout=DEFAULT_CLI_TIMEOUT, token=token, tls=tls,
        keepalive=args.keepalive,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tolerate_any_stdout_encoding()
    try:
        with make_client(args) as client:
            return args.func(client, args)
    except RnnServeError as err:
        _say(f"error: {err.code}: {err.details}")
        return err.exit_code
    except (ValueError, SeriesFileError, PlotError) as err:
        _say(f"error: {err}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `rnn-client generate ... | head` closed stdout: stop quietly, without the
        # interpreter's own complaint when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _say(line: str) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
