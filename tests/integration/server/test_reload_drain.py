"""Hot reload: how removed versions drain and unload, on an in-process server."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings

WAIT_S = 30.0  # bound on the wait, not a speed assertion


def test_an_idle_removed_version_unloads_while_another_removed_one_still_drains(
    model_repo: Path, tmp_path: Path
) -> None:
    """One rescan removes two versions, one with a stream still running: the idle one's
    decode threads (a process under --decode-process 1, and its memory) go at once. They
    were closed one after the other, so the idle one waited for the other's stream."""
    repo = tmp_path / "repo"
    for name in ("gru", "lstm"):
        for version in ("1", "2"):
            shutil.copytree(model_repo / name / "1", repo / name / version)
    srv = ServerThread(make_settings(repo)).start()
    engine = srv.app.engine
    try:
        for name in ("gru", "lstm"):
            request = pb.GenerateRequest(model=name, version="2", prompt="ab", max_tokens=3)
            assert list(srv.stub.Generate(request))
        first, second = list(engine.repository.models)  # the order the rescan retires them
        busy, idle = engine._decoders[(first, "2")], engine._decoders[(second, "2")]
        srv.call(busy.admit)  # a long stream on the version retired first
        for name in ("gru", "lstm"):
            shutil.rmtree(repo / name / "2")
        pending = srv.admin.ReloadModels.future(pb.ReloadModelsRequest(), timeout=60)

        def idle_gone() -> bool:
            return idle._closed and not any(t.is_alive() for t in idle._threads)

        end = time.monotonic() + WAIT_S
        while not srv.call(idle_gone) and time.monotonic() < end:
            time.sleep(0.05)
        assert srv.call(idle_gone), f"{second}/2 has no stream, yet its decode threads live on"
        assert not srv.call(lambda: busy._closed), f"{first}/2 closed under its stream"
        assert not pending.done(), "the reply waits for every removed version"
        srv.call(busy.release)  # the long stream ends
        assert sorted(pending.result().unloaded) == ["gru/2", "lstm/2"]
        assert srv.call(lambda: busy._closed)
    finally:
        srv.stop()
