"""Why ONNX Runtime refused a package's graph, in one line a user can act on.

Both sides say it: `rnn-trainer package`/`export` when they check a graph, and the server
when a version does not load (its NOT_SERVING reason). ORT's own message starts with the C++
source line and signature (a cut at a few hundred characters lost the reason) and, for a
file, a staging path the user never sees; a graph newer than the installed onnxruntime is
said with the opset or IR version to export instead.
"""

from __future__ import annotations

import re

_NOISE = re.compile(r"Load model from .*? failed:|/onnxruntime_src/\S+:\d+ [^\n]*?\) ")
_OPSET = re.compile(
    r"Opset (\d+) is under development.*?Current official support for domain (\S+) is till"
    r" opset (\d+)",
    re.S,
)
_IR = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")


def _ort_version() -> str:
    try:
        import onnxruntime
    except ImportError:  # the reason is still worth saying without the version
        return "?"
    return onnxruntime.__version__


def ort_reason(text: str, limit: int = 300) -> str:
    """The first line of an ORT error message without its source-line and path noise, at
    most `limit` characters; a graph too new for this onnxruntime is said with what to
    export instead."""
    text = _NOISE.sub("", text).strip()
    if found := _OPSET.search(text):
        opset, domain, top = found.groups()
        return (
            f"the graph's {domain} opset {opset} is newer than onnxruntime {_ort_version()}"
            f" runs (up to opset {top}); export with opset_version={top} or lower (the"
            " server's onnxruntime must run it too)"
        )
    if found := _IR.search(text):
        return (
            f"{found.group(0)} (onnxruntime {_ort_version()}); save the graph with an onnx"
            f" package that writes IR version {found.group(2)} or lower"
        )
    return (text.splitlines() or [""])[0][:limit]
