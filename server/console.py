"""The `rnn-server` console script: the stop signals are handled before anything heavy loads.

Importing the server (grpc, onnxruntime, numpy, aiohttp) takes about a second; until
`main.main` installs its start-up handlers, a SIGTERM would end a plain process with status
143 and be dropped by the kernel where rnn-server is PID 1 (a container's entrypoint with no
init), which then served on until the SIGKILL at the end of the grace period. Here the same
rule as while the models load holds from the first line: SIGTERM/SIGINT exit 0 (nothing to
drain yet), and a SIGHUP (its default action kills) is ignored: the first scan, after the
imports, sees whatever it announced.
"""

from __future__ import annotations

import signal
import sys
from typing import Any


def _stop_while_importing(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main() -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_while_importing)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from rnnserve.server.main import main as serve_main  # installs its own handlers

    return serve_main()


if __name__ == "__main__":
    sys.exit(main())
