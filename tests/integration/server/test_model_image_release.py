"""A version a reload removes lets go of its sealed model bytes (server/model_image.py) and of
its ONNX Runtime sessions when its decode process closes, not whenever Python's cyclic garbage
collector next runs: the decode process and its prefill loop referred to each other, so the
copy (a model's size of shared memory) and the sessions outlived the version until a full
collection, for each version a reload removed."""

from __future__ import annotations

import gc
import os
import shutil
import weakref
from pathlib import Path

from rnnserve.server.errors import EngineUnavailable
from rnnserve.v1 import rnnserve_pb2 as pb
from tests.integration.server.harness import ServerThread, make_settings
from tests.integration.server.test_generate import PROMPT, _generate, _ids


def _is_memfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:rnnserve")
    except OSError:  # closed
        return False


def test_a_removed_version_frees_its_model_image_when_its_decode_process_closes(
    model_repo: Path, tmp_path: Path
) -> None:
    shutil.copytree(model_repo / "rnn", tmp_path / "rnn")
    shutil.copytree(model_repo / "rnn" / "1", tmp_path / "rnn" / "2")
    srv = ServerThread(make_settings(tmp_path, decode_process=1)).start()
    collecting = gc.isenabled()
    gc.disable()  # what the server frees must not depend on when a collection happens
    try:
        got = _generate(srv.stub, model="rnn", version="1", prompt=PROMPT, max_tokens=8)
        assert len(_ids(got)) == 8  # version 1 has its decode process
        decoder = srv.call(lambda: next(d for d in srv.app.engine.decoders() if d.name == "rnn"))
        image = decoder.model.image
        assert image is not None and _is_memfd(image.fd)
        shutil.rmtree(tmp_path / "rnn" / "1")
        reply = srv.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=60)
        assert list(reply.unloaded) == ["rnn/1"]  # answered once its decode process closed
        assert not _is_memfd(image.fd), "the removed version's bytes are still held"
        # a stream that reached the closed decoder anyway starts no child on freed bytes
        refused = srv.call(decoder._child_or_refusal)
        assert isinstance(refused, EngineUnavailable) and decoder.pid is None
        got = _generate(srv.stub, model="rnn", prompt=PROMPT, max_tokens=8)
        assert len(_ids(got)) == 8  # version 2 serves on
        session = weakref.ref(decoder.model.session)
        del decoder, image, refused
        srv.call(lambda: None)  # the event loop has run past the close
        assert session() is None, "the removed version's ORT session waits for a collection"
    finally:
        if collecting:
            gc.enable()
        srv.stop()


def test_a_removed_version_frees_its_session_at_once_in_process(
    model_repo: Path, tmp_path: Path
) -> None:
    """The same without --decode-process: nothing keeps the removed version's session alive."""
    shutil.copytree(model_repo / "rnn", tmp_path / "rnn")
    shutil.copytree(model_repo / "rnn" / "1", tmp_path / "rnn" / "2")
    srv = ServerThread(make_settings(tmp_path)).start()
    collecting = gc.isenabled()
    gc.disable()
    try:
        got = _generate(srv.stub, model="rnn", version="1", prompt=PROMPT, max_tokens=8)
        assert len(_ids(got)) == 8  # version 1's decode loop ran
        decoder = srv.call(lambda: next(d for d in srv.app.engine.decoders() if d.name == "rnn"))
        session = weakref.ref(decoder.model.session)
        del decoder
        shutil.rmtree(tmp_path / "rnn" / "1")
        reply = srv.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=60)
        assert list(reply.unloaded) == ["rnn/1"]
        srv.call(lambda: None)
        assert session() is None, "the removed version's ORT session waits for a collection"
    finally:
        if collecting:
            gc.enable()
        srv.stop()
