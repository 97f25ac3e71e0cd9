"""rnnserve: train, export and serve recurrent sequence models (parts: rnnserve.<part>).

The version is read from the installed distribution's metadata, so pyproject.toml is the
one place it is written; every console script prints it with --version.
"""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rnnserve")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """`--version` prints 'PROG VERSION' and exits 0 (the same line for every CLI)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
