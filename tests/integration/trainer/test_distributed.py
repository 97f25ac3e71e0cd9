"""Data-parallel training through real processes: gloo process groups on this machine.

The proof that it is the same training: 2 ranks and 1 process on the same data, seed and
global batch end with the same weights (to float rounding of the all-reduce); a 2-rank run
killed mid-epoch and resumed ends where an uninterrupted run does. Bad setups end with one
`error:` line, not a hang. Ranks are started the way torchrun starts them (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so a test can kill or freeze one; `--nproc` runs torchrun itself.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from rnnserve.trainer import cli
from rnnserve.trainer.distributed import (
    Cluster,
    _without_nproc,
    backend_for,
    env_cluster,
    joined,
)
from rnnserve.trainer.errors import TrainerError
from rnnserve.trainer.sampling import num_batches, random_batches, sequential_batches

pytestmark = pytest.mark.slow

TINY = ["--hidden", "8", "--embed", "4", "--num-steps", "8", "--max-tokens", "2000",
        "--no-progress", "--threads", "1", "--dropout", "0", "--weight-drop", "0"]  # fmt: skip
# --dropout 0 --weight-drop 0: the recipe's masks are drawn differently on each rank than in
# one process (the gru's DropConnect mask is one per forward pass, so one per rank)
TOLERANCE = 1e-5  # seen: ~2e-7 after 100 steps; a wrong shard or a missing average: > 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rnnserve.trainer.cli", "train", *args]


def start_ranks(
    args: list[str], cwd: Path, world: int = 2, ranks=None, port: int | None = None
) -> list[subprocess.Popen]:
    """One process per rank with the environment torchrun gives its workers."""
    port = str(port or _free_port())
    procs = []
    for rank in ranks if ranks is not None else range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}  # fmt: skip
        procs.append(subprocess.Popen(
            _train_cmd(*args), cwd=cwd, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ))  # fmt: skip
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append((p.returncode, out, err))
    finally:
        _kill(procs)
    return done


def _kill(procs: list[subprocess.Popen]) -> None:
    """Ends ranks a failed test leaves running: they would train on beside the next tests."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def one_process(args: list[str], capsys) -> str:
    assert cli.main(["train", *args]) == 0
    return capsys.readouterr().out


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        diff = (tensor - b["state_dict"][name]).abs().max().item()
        assert diff <= TOLERANCE, f"{name} differs by {diff}"
    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert ra["tokens"] == rb["tokens"]  # the global token count, summed over ranks
        assert ra["val_ppl"] == pytest.approx(rb["val_ppl"], rel=1e-5)  # reduced over ranks
        assert ra["train_ppl"] == pytest.approx(rb["train_ppl"], rel=1e-5)


# --- the batches: ranks split every global batch exactly ------------------------------------


@pytest.mark.parametrize("sampler", [random_batches, sequential_batches])
def test_ranks_partition_every_global_batch(sampler) -> None:
    ids = list(range(500))
    whole = list(sampler(ids, 6, 7, random.Random(3)))
    parts = [list(sampler(ids, 6, 7, random.Random(3), rank, 3)) for rank in range(3)]
    assert len(whole) >= num_batches(len(ids) - 6, 6, 7) > 0
    assert all(len(p) == len(whole) for p in parts)
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[step][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[step][1] for p in parts]), y)


def test_sequential_gives_each_rank_one_contiguous_shard() -> None:
    ids = list(range(1000))
    starts = []
    for rank in range(2):
        windows = list(sequential_batches(ids, 4, 5, random.Random(1), rank, 2))
        rows = torch.cat([x for x, _ in windows], dim=1).tolist()  # [2 rows, time]
        for row in rows:  # each row continues itself from window to window: state carries
            assert row == list(range(row[0], row[0] + len(row)))
        starts += [row[0] for row in rows]
    # rows of equal length back to back, rank 0's first: each rank reads one stretch
    assert len({b - a for a, b in itertools.pairwise(starts)}) == 1
    assert starts == sorted(starts)


def test_validation_rows_are_shared_out_without_gaps_or_overlap() -> None:
    for world in (1, 2, 3, 5, 20):
        got = [i for r in range(world) for i in range(16)[Cluster(r, world).rows(16)]]
        assert got == list(range(16)), world


def test_torchrun_environment_and_the_shortcut_arguments() -> None:
    assert env_cluster({}) == Cluster(0, 1, 0)
    assert env_cluster({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Cluster(3, 4, 1)
    with pytest.raises(TrainerError, match="RANK=4 WORLD_SIZE=4"):
        env_cluster({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(TrainerError, match="bad torchrun environment"):
        env_cluster({"WORLD_SIZE": "two"})
    assert _without_nproc(["train", "--nproc", "2", "--arch", "gru", "--nproc=3"]) == [
        "train", "--arch", "gru"]  # fmt: skip
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda") == "nccl"


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-1"])
def test_a_dist_timeout_that_bounds_nothing_is_one_error_line(tmp_path: Path, timeout) -> None:
    """inf crashed the --nproc launcher with an OverflowError traceback and NaN said "cannot
    convert float NaN to integer"; under torchrun NaN reached timedelta. Both paths refuse it
    before any process group forms."""
    run = subprocess.run(
        _train_cmd("--nproc", "2", "--batch-size", "4", *TINY, "--dist-timeout", timeout),
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert _errors(run.stderr) == [
        f"error: --dist-timeout must be a positive, finite number of seconds, got {timeout}"
    ]
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with (
        mock.patch.dict(os.environ, env),
        pytest.raises(TrainerError, match="finite"),
        joined("cpu", float(timeout)),
    ):
        pytest.fail("no process group forms with this timeout")


# --- same training: 2 ranks == 1 process ------------------------------------------------------


CASES = {
    "lstm-sequential-truncated": ["--arch", "lstm", "--sampling", "sequential",
                                  "--bptt", "truncated", "--bptt-k", "3"],
    "gru-random-randombptt-clipped-sgd": ["--arch", "gru", "--sampling", "random", "--bptt",
                                          "random", "--bptt-p", "0.6",
                                          "--clip", "0.05", "--optimizer", "sgd", "--lr", "0.5"],
    "rnn-infill": ["--arch", "rnn", "--task", "infill", "--lr-decay", "0.5"],
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_train_the_same_weights_as_one_process(case, tmp_path: Path, capsys) -> None:
    args = [*TINY, *CASES[case], "--epochs", "2", "--batch-size", "8"]
    ranks = start_ranks([*args, "--out", "m2", "--run-dir", "r2", "--dist-timeout", "60"],
                        tmp_path)  # fmt: skip
    single = one_process([*args, "--out", str(tmp_path / "m1"), "--run-dir",
                          str(tmp_path / "r1")], capsys)  # fmt: skip
    (code0, out0, err0), (code1, out1, err1) = finish(ranks)
    assert (code0, code1) == (0, 0), err0 + err1
    assert_same_weights(weights(tmp_path / "r1"), weights(tmp_path / "r2"))
    # rank 0 alone logs and exports; rank 1 says nothing
    assert out1 == "" and "error" not in err1
    assert out0.count("epoch 2/2") == 1 and single.count("epoch 2/2") == 1
    assert len((tmp_path / "r2" / "log.jsonl").read_text().splitlines()) == 2
    assert len(list((tmp_path / "m2").glob("*/1/model.onnx"))) == 1


def test_nproc_shortcut_runs_torchrun(tmp_path: Path, capsys) -> None:
    args = [*TINY, "--arch", "lstm", "--sampling", "sequential", "--epochs", "1",
            "--batch-size", "4"]  # fmt: skip
    run = subprocess.run(
        _train_cmd("--nproc", "2", *args, "--out", "m2", "--run-dir", "r2"),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("exported ") == 1 and run.stdout.count("epoch 1/1") == 1
    one_process([*args, "--out", str(tmp_path / "m1"), "--run-dir", str(tmp_path / "r1")], capsys)
    assert_same_weights(weights(tmp_path / "r1"), weights(tmp_path / "r2"))


def test_a_rank_without_validation_rows_and_errors_every_rank_meets(tmp_path: Path) -> None:
    """A validation split too small for every rank to get a row still gives a finite
    perplexity (the empty rank adds nothing; its NaN once read as "diverged"); an error every
    rank meets alike is said once; --precision leaves no temp dir behind on other ranks."""
    base = [*TINY, "--arch", "rnn", "--epochs", "1", "--batch-size", "4"]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    run = subprocess.run(
        _train_cmd("--nproc", "2", *base, "--max-tokens", "4000", "--val-fraction", "0.001",
                   "--precision", "fp16", "--out", "m", "--run-dir", "r"),  # 4 val tokens: 1 row
        cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "diverged" not in run.stderr and run.stdout.count("exported ") == 1
    left = [p.name for p in tmp.iterdir() if p.name.startswith("tmp")]  # TemporaryDirectory's
    assert not left, f"a rank left its temporary folder behind: {left}"
    bad = subprocess.run(
        _train_cmd("--nproc", "2", *base, "--lr", "-1", "--out", "m", "--run-dir", "r"),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0
    assert bad.stderr.count("--lr must be positive") == 1, bad.stderr


# --- kill mid-epoch, resume: the uninterrupted result ------------------------------------------


KILL_ATTEMPTS = 3


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            _kill(procs)
            pytest.fail(f"{path} never appeared")
        assert all(p.poll() is None for p in procs), finish(procs)
        time.sleep(0.02)


def test_killed_mid_epoch_and_resumed_matches_an_uninterrupted_run(tmp_path: Path, capsys):
    args = [*TINY, "--arch", "gru", "--sampling", "sequential", "--max-tokens", "3000",
            "--batch-size", "8", "--epochs", "2"]  # fmt: skip
    run = ["--out", "m2", "--run-dir", "r2"]
    # epoch 2 ends about 0.5 s after epoch 1's log line: a kill that a busy machine delays past
    # that is a lost race, not a failure of resuming, so the setup is run again (a few times)
    for _ in range(KILL_ATTEMPTS):
        shutil.rmtree(tmp_path / "r2", ignore_errors=True)
        shutil.rmtree(tmp_path / "m2", ignore_errors=True)
        procs = start_ranks([*args, *run], tmp_path)
        _wait_for(tmp_path / "r2" / "log.jsonl", procs)  # epoch 1 is checkpointed; 2 is running
        for p in procs:
            p.send_signal(signal.SIGKILL)
        finish(procs)
        if weights(tmp_path / "r2")["epoch"] == 1:
            break
    assert weights(tmp_path / "r2")["epoch"] == 1, "every kill came after epoch 2 ended"
    assert not (tmp_path / "m2").exists()
    shutil.copytree(tmp_path / "r2", tmp_path / "r1-resumed")
    resumed = finish(start_ranks([*args, *run, "--resume", "r2"], tmp_path))
    assert [code for code, _, _ in resumed] == [0, 0], resumed[0][2] + resumed[1][2]
    assert "resuming r2 after epoch 1" in resumed[0][1]
    one_process([*args, "--out", str(tmp_path / "m1"), "--run-dir", str(tmp_path / "r1")], capsys)
    assert_same_weights(weights(tmp_path / "r1"), weights(tmp_path / "r2"))
    # the Job restarted once more (its pods died during the export): the same command exports
    # the finished run's model again, where it used to refuse ("raise --epochs to continue")
    exported = weights(tmp_path / "m2" / "gru" / "1")["state_dict"]
    shutil.rmtree(tmp_path / "m2")
    again = finish(start_ranks([*args, *run, "--resume", "r2"], tmp_path))
    assert [code for code, _, _ in again] == [0, 0], again[0][2] + again[1][2]
    assert "exporting it without training" in again[0][1]
    assert weights(tmp_path / "r2")["epoch"] == 2
    reexported = weights(tmp_path / "m2" / "gru" / "1")["state_dict"]
    assert all(torch.equal(exported[k], reexported[k]) for k in exported)
    # the world size is not part of the arithmetic: one process resumes the 2-rank checkpoint
    resumed_alone = tmp_path / "r1-resumed"
    one_process([*args, "--out", str(tmp_path / "m3"), "--run-dir", str(resumed_alone),
                 "--resume", str(resumed_alone)], capsys)  # fmt: skip
    assert_same_weights(weights(tmp_path / "r1"), weights(resumed_alone))


# --- bad setups: one clear message, never a hang ----------------------------------------------


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_world_size_that_does_not_divide_the_batch(tmp_path: Path) -> None:
    run = subprocess.run(_train_cmd("--nproc", "2", "--batch-size", "5", *TINY), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert _errors(run.stderr) == [
        "error: --batch-size 5 (the global batch) is not divisible by the world size 2; "
        "use a multiple of 2"
    ]
    assert "Traceback" not in run.stderr
    # under torchrun every rank finds it; rank 0 alone says it
    said = finish(start_ranks(["--batch-size", "5", *TINY], tmp_path))
    assert [code for code, _, _ in said] == [2, 2]
    assert len(_errors(said[0][2])) == 1 and said[1][2] == ""


def test_a_split_too_short_is_said_once(tmp_path: Path) -> None:
    """Every rank reads the same corpus and finds it too short inside the group: rank 1 said
    it too (`error: rank 1/2: training split has ...`)."""
    said = finish(start_ranks([*TINY, "--batch-size", "8", "--num-steps", "500"], tmp_path))
    assert [code for code, _, _ in said] == [2, 2]
    (line,) = _errors(said[0][2])
    assert "training split has" in line and "too few" in line
    assert _errors(said[1][2]) == [], said[1][2]


@pytest.mark.parametrize(
    ("flags", "said"),
    [(["--corpus", "missing.txt"], "corpus missing.txt does not exist"),
     (["--resume", "missing.pt"], "missing.pt")],
)  # fmt: skip
def test_a_missing_corpus_or_checkpoint_is_said_once(tmp_path: Path, flags, said) -> None:
    """Read inside the group, every rank printed them (`error: rank 1/2: corpus ...`)."""
    ranks = finish(start_ranks([*TINY, "--batch-size", "8", "--epochs", "1", *flags], tmp_path))
    assert [code for code, _, _ in ranks] == [2, 2]
    (line,) = _errors(ranks[0][2])
    assert said in line, line
    assert _errors(ranks[1][2]) == [], ranks[1][2]


def test_count_models_refuse_data_parallel(tmp_path: Path) -> None:
    run = subprocess.run(_train_cmd("--nproc", "2", "--arch", "ngram", *TINY), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert _errors(run.stderr) == [
        "error: --arch ngram trains in one process; data-parallel training (torchrun, --nproc) "
        "is for rnn, gru and lstm"
    ]


def _long_run(tmp_path: Path, timeout_s: str) -> list[subprocess.Popen]:
    args = [*TINY, "--arch", "lstm", "--epochs", "50", "--batch-size", "8",
            "--dist-timeout", timeout_s, "--out", "m", "--run-dir", "r"]  # fmt: skip
    procs = start_ranks(args, tmp_path)
    _wait_for(tmp_path / "r" / "log.jsonl", procs)  # rank 0 plots, rank 1 waits in epoch 2
    return procs


def test_a_rank_that_dies_ends_the_run_with_one_message(tmp_path: Path) -> None:
    rank0, rank1 = _long_run(tmp_path, "60")
    t0 = time.monotonic()
    rank1.send_signal(signal.SIGKILL)
    code, _out, err = finish([rank0], timeout=60)[0]
    assert time.monotonic() - t0 < 30, "rank 0 should notice the lost peer at once"
    assert code == 2, err
    (line,) = _errors(err)
    assert "rank 0/2: a collective failed, so another rank died" in line
    assert "--resume" in line and "Traceback" not in err
    rank1.communicate()


def test_a_rank_that_stalls_ends_the_run_after_the_timeout(tmp_path: Path) -> None:
    rank0, rank1 = _long_run(tmp_path, "4")
    rank1.send_signal(signal.SIGSTOP)  # alive but silent: only the timeout can end the wait
    t0 = time.monotonic()
    try:
        code, _out, err = finish([rank0], timeout=60)[0]
    finally:
        rank1.send_signal(signal.SIGKILL)
        rank1.communicate()
    assert 3 < time.monotonic() - t0 < 40
    assert code == 2, err
    (line,) = _errors(err)
    assert "stalled longer than --dist-timeout 4s" in line


def test_a_rank_that_never_joins_ends_after_the_timeout(tmp_path: Path) -> None:
    (rank0,) = start_ranks([*TINY, "--batch-size", "8", "--dist-timeout", "3"], tmp_path,
                           ranks=[0])  # fmt: skip
    t0 = time.monotonic()
    code, _out, err = finish([rank0], timeout=60)[0]
    assert time.monotonic() - t0 < 40
    assert code == 2
    (line,) = _errors(err)
    assert "could not form the gloo process group" in line and "within 3s" in line


def test_a_busy_rendezvous_port_is_one_line_on_every_rank(tmp_path: Path) -> None:
    """MASTER_PORT held by another program that accepts and never answers: rank 0 cannot
    listen there (it said EADDRINUSE inside "could not form ... within 300s"), and rank 1's
    store handshake with that program waited forever, past --dist-timeout."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(8)  # connections complete in the backlog; nothing ever answers
        port = busy.getsockname()[1]
        ranks = start_ranks([*TINY, "--batch-size", "8", "--dist-timeout", "2"], tmp_path,
                            port=port)  # fmt: skip
        (code0, _, err0), (code1, _, err1) = finish(ranks, timeout=90)
    assert (code0, code1) == (2, 2), err0 + err1
    assert _errors(err0) == [
        f"error: rank 0/2: the rendezvous port 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) is in "
        "use by another program; choose a free MASTER_PORT, or let torchrun --standalone or "
        "--nproc pick one"
    ]
    (line,) = _errors(err1)
    assert f"rank 1/2 could not form the gloo process group at 127.0.0.1:{port} within 2s" in line
    assert "another program listening on MASTER_PORT" in line


def _started_nproc_run(tmp_path: Path) -> subprocess.Popen:
    launcher = subprocess.Popen(
        _train_cmd("--nproc", "2", *TINY, "--arch", "lstm", "--epochs", "50", "--batch-size",
                   "8", "--out", "m", "--run-dir", "r"),
        cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )  # fmt: skip
    _wait_for(tmp_path / "r" / "log.jsonl", [launcher])
    return launcher


def test_ctrl_c_and_sigterm_stop_nproc_with_one_line_and_the_signal_exit(tmp_path) -> None:
    """Ctrl-C (SIGINT to the whole group) ended `--nproc` with a SignalException traceback,
    exit 1, and an `error: interrupted` from every rank; SIGTERM to the launcher alone with the
    traceback and no word from the ranks it stopped."""
    launcher = _started_nproc_run(tmp_path)
    os.killpg(launcher.pid, signal.SIGINT)
    _out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, err
    (line,) = _errors(err)  # rank 0's, with the command that resumes
    assert line.startswith("error: interrupted; ") and "--resume r" in line, line
    assert "--nproc 2" in line, line  # the rank's argv lost it: the hint gives it back
    assert "Traceback" not in err and "death signal" not in err, err
    shutil.rmtree(tmp_path / "r")
    launcher = _started_nproc_run(tmp_path)
    launcher.send_signal(signal.SIGTERM)
    _out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM, err
    assert _errors(err) == [
        "error: stopped by SIGTERM; the ranks were stopped with it. Resume from the last "
        "checkpoint with --resume RUN_DIR"
    ]
    assert "Traceback" not in err, err


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _local_rank(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LOCAL_RANK=")]
    return found[0] if found else None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_nproc_reports_a_killed_rank_in_one_line(tmp_path: Path) -> None:
    launcher = subprocess.Popen(
        _train_cmd("--nproc", "2", *TINY, "--arch", "lstm", "--epochs", "50", "--batch-size",
                   "8", "--out", "m", "--run-dir", "r"),
        cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _wait_for(tmp_path / "r" / "log.jsonl", [launcher])
    (rank1,) = [pid for pid in _children(launcher.pid) if _local_rank(pid) == "1"]
    os.kill(rank1, signal.SIGKILL)
    _out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 2, err
    (line,) = _errors(err)  # rank 0's lost-peer line or the launcher's dead-rank line
    assert "rank 1 of 2 died (signal SIGKILL)" in line or "another rank died" in line, line
    assert "Traceback" not in err and "ChildFailedError" not in err
