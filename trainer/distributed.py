"""Data-parallel training: torchrun's environment -> one process group -> DistributedDataParallel.

Why PyTorch's own engine and not a home-made one: `torchrun` (one node or many, c10d
rendezvous) and DDP (bucketed gradient all-reduce overlapped with backward) are what the
ecosystem runs and debugs. This module only adapts them to the recurrent trainer:

- the world is read from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT); WORLD_SIZE > 1 starts a group: gloo on CPU, NCCL on CUDA;
- the process group has a timeout, so a rank that dies or stalls ends the run with one
  `error:` line (`PeerFailure`) instead of a hang;
- DDP wraps one BPTT *window* (`WindowModule`), so truncated and randomized BPTT, which call
  the model several times per step, still do one DDP forward per backward;
- `rnn-trainer train --nproc N` is a shortcut that runs torchrun's launcher in-process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from rnnserve.trainer.bptt import run_window
from rnnserve.trainer.errors import AgreedError, TrainerError
from rnnserve.trainer.sampling import rank_rows

DEFAULT_TIMEOUT_S = 300.0
Window = Callable[
    [torch.Tensor, tuple[torch.Tensor, ...], torch.Generator | None],
    tuple[torch.Tensor, tuple[torch.Tensor, ...]],
]


class PeerFailure(TrainerError):
    """A collective failed: another rank died, stalled past the timeout, or was unreachable.

    Every surviving rank reports it; errors that every rank hits alike are said by rank 0."""


NPROC_ENV = "RNNSERVE_NPROC"  # set by launch() for its ranks: the --nproc they run under


class RankError(TrainerError):
    """An error a non-zero rank met inside the group (its message names the rank)."""


@dataclass(frozen=True)
class Cluster:
    """Where this process stands: rank `rank` of `world` (1 = plain single-process training)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, curves, checkpoints and the export."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def local_batch(self, global_batch: int) -> int:
        rows = rank_rows(global_batch, self.rank, self.world)
        return rows.stop - rows.start

    def rows(self, n: int) -> slice:
        """A contiguous near-equal share of n items (validation rows), possibly empty."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (float64; on the GPU under NCCL)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def env_cluster(env: dict[str, str] | None = None) -> Cluster:
    """The world torchrun describes in the environment; no variables = a single process."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise TrainerError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise TrainerError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return Cluster(rank, world, local_rank)


def current() -> Cluster:
    """The live process group's view (fit asks this), or a single process when none is up."""
    if not (dist.is_available() and dist.is_initialized()):
        return Cluster()
    return Cluster(dist.get_rank(), dist.get_world_size(), env_cluster().local_rank)


def speaks(exc: BaseException) -> bool:
    """Whether this process prints `exc`: a setup error every rank hits alike is said once,
    by rank 0; what a rank meets on its own inside the group it says itself."""
    return isinstance(exc, (PeerFailure, RankError)) or env_cluster().is_main


def backend_for(device: str) -> str:
    """NCCL when the run is on CUDA GPUs (`cuda`, or `auto` with a GPU present), else gloo."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def _is_collective_error(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "NCCL", "Connection closed", "Timed out", "peer")
    )


@contextlib.contextmanager
def joined(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Cluster]:
    """Joins torchrun's process group for the duration of a run (a no-op for one process).

    A failed collective inside becomes PeerFailure; after one the group cannot be torn down
    cleanly (gloo aborts in its destructor), so `abandon()` ends the process once it is said.
    Setup errors (same argv, same message on every rank) should be raised before joining.
    """
    cluster = env_cluster()
    if not cluster.distributed:
        yield cluster
        return
    check_timeout(timeout_s)
    backend = backend_for(device)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if backend == "nccl":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cluster.local_rank >= visible:
            # RankError: the ranks past the GPU count say it themselves; a plain TrainerError
            # is said by rank 0 alone, which has a GPU, so `--nproc 2` on one GPU exited 2
            # without a word. No GPU at all: every rank alike, rank 0 says it.
            error = RankError if visible else TrainerError
            raise error(
                f"rank {cluster.rank} needs GPU {cluster.local_rank} but {visible} are "
                "visible; lower --nproc (torchrun: --nproc_per_node)"
            )
        torch.cuda.set_device(cluster.local_rank)
    failed = (
        f"rank {cluster.rank}/{cluster.world} could not form the {backend} process group at "
        f"{where} within {timeout_s:g}s (--dist-timeout)"
    )
    watchdog = _rendezvous_watchdog(
        f"{failed}: no rendezvous store answered there (a peer that never came, or another "
        "program listening on MASTER_PORT)",
        timeout_s,
    )
    try:
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), rank=cluster.rank,
            world_size=cluster.world,
        )  # fmt: skip
    except Exception as exc:  # the store or a peer never answered: one line, no traceback
        if _port_taken(exc):
            raise PeerFailure(
                f"rank {cluster.rank}/{cluster.world}: the rendezvous port {where} "
                "(MASTER_ADDR:MASTER_PORT) is in use by another program; choose a free "
                "MASTER_PORT, or let torchrun --standalone or --nproc pick one"
            ) from exc
        raise PeerFailure(f"{failed}: {_first_line(exc)}") from exc
    finally:
        watchdog.cancel()
    if cluster.world > 1 and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupt_once)  # a rank process: it exits after
    try:
        yield cluster
    except KeyboardInterrupt:  # Ctrl-C reaches every rank (torchrun and --nproc pass it on)
        if cluster.is_main:
            raise  # rank 0 says `error: interrupted` with the --resume command
        abandon(130)  # the others end quietly: one line per run, not one per rank
    except TrainerError as exc:
        _leave()
        if cluster.is_main or isinstance(exc, (PeerFailure, AgreedError)):
            raise  # an AgreedError: rank 0 says it (speaks), the others end quietly
        raise RankError(f"rank {cluster.rank}/{cluster.world}: {exc}") from exc
    except Exception as exc:
        if not _is_collective_error(exc):
            _leave()
            raise
        raise PeerFailure(
            f"rank {cluster.rank}/{cluster.world}: a collective failed, so another rank died or "
            f"stalled longer than --dist-timeout {timeout_s:g}s; the run stopped (resume from "
            f"the last checkpoint with --resume): {_first_line(exc)}"
        ) from exc
    else:
        _leave()


def check_timeout(timeout_s: float) -> None:
    """--dist-timeout must be a finite number of seconds > 0: it bounds every wait (inf would
    be a hang, not a bound), and inf or NaN crashed the launcher with a traceback."""
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise TrainerError(
            f"--dist-timeout must be a positive, finite number of seconds, got {timeout_s:g}"
        )


RENDEZVOUS_GRACE_S = 5.0  # past --dist-timeout, so torch's own timeout error comes first


def _rendezvous_watchdog(message: str, timeout_s: float) -> threading.Timer:
    """Ends the process with `error: message` if the rendezvous outlives --dist-timeout.

    Why: torch's store client waits without a bound for the handshake of whatever accepted its
    connection; a rank whose MASTER_PORT another program listens on (rank 0 then fails with
    EADDRINUSE) hung there forever. The wait is in C++, so only an exit can end it."""

    def expire() -> None:
        print(f"error: {message}", file=sys.stderr)
        abandon(2)

    timer = threading.Timer(min(timeout_s + RENDEZVOUS_GRACE_S, threading.TIMEOUT_MAX), expire)
    timer.daemon = True
    timer.start()
    return timer


def _port_taken(exc: BaseException) -> bool:
    """Rank 0 hosts the rendezvous store on MASTER_PORT and could not listen there."""
    text = str(exc)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def _leave() -> None:
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def abandon(code: int) -> NoReturn:
    """Exits at once, skipping destructors: gloo's can abort the process (after a failed
    collective, or at interpreter exit while its worker threads still hold tensors)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class WindowModule(nn.Module):
    """One BPTT window as one module call: DDP then sees one forward per backward."""

    def __init__(self, model: nn.Module, mode: str, k: int, p: float) -> None:
        super().__init__()
        self.model, self.mode, self.k, self.p = model, mode, k, p

    def forward(self, x: torch.Tensor, *state: torch.Tensor, gen: torch.Generator | None = None):
        return run_window(self.model, x, tuple(state), self.mode, self.k, self.p, gen)


def window_runner(
    model: nn.Module, cluster: Cluster, device: torch.device, mode: str, k: int, p: float
) -> Window:
    """(x, state, gen) -> (logits, state); under a process group the gradient of every step is
    averaged over ranks by DDP, so the update is the one-process update of the global batch."""
    if not cluster.distributed:
        return lambda x, state, gen: run_window(model, x, state, mode, k, p, gen)
    ddp = nn.parallel.DistributedDataParallel(
        WindowModule(model, mode, k, p),
        device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None,
    )

    def run(x: torch.Tensor, state: tuple[torch.Tensor, ...], gen: torch.Generator | None):
        logits, new_state = ddp(x, *state, gen=gen)
        return logits, tuple(new_state)

    return run


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(argv: Sequence[str], nproc: int, batch_size: int, timeout_s: float) -> int:
    """`rnn-trainer train --nproc N ...`: what `torchrun --standalone --nproc_per_node N -m
    rnnserve.trainer.cli train ...` does, with failures summed up in one line."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise TrainerError("--nproc must be at least 1")
    check_timeout(timeout_s)
    rank_rows(batch_size, 0, nproc)  # the world must divide the global batch: say so up front
    _quiet_elastic_logs()  # we say it
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",
        rdzv_configs={"timeout": math.ceil(timeout_s)}, max_restarts=0, monitor_interval=0.2,
    )  # fmt: skip
    args = ["-u", "-m", "rnnserve.trainer.cli", *_without_nproc(argv)]
    os.environ[NPROC_ENV] = str(nproc)  # the ranks' --resume hint names it again
    try:
        elastic_launch(config, sys.executable)(*args)
    except SignalException as exc:
        return stopped_by(exc.sigval)
    except ChildFailedError as exc:
        # the cause first: a rank that exited by itself said why (error: ... or a traceback);
        # else one killed by something other than the launcher's own SIGTERM to the others
        rank, failure = min(
            exc.failures.items(),
            key=lambda kv: (kv[1].exitcode <= 0, kv[1].exitcode == -signal.SIGTERM, kv[0]),
        )
        if failure.exitcode > 0:
            return failure.exitcode
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else "no status"
        raise TrainerError(
            f"rank {rank} of {nproc} died ({how}); the run stopped. Resume from the last "
            "checkpoint with --resume RUN_DIR"
        ) from exc
    return 0


def _interrupt_once(signum: int, frame: object) -> None:
    """A rank's SIGINT handler: Ctrl-C reaches it twice, from the terminal's process group
    and again from the launcher, which passes the signal on; a second KeyboardInterrupt
    landing while rank 0 says `error: interrupted` cut that line (seen in CI), so the
    first one is the only one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def stopped_by(sig: int) -> int:
    """The launcher's exit status when it is told to stop (Ctrl-C, `kill`): the launcher passes
    the signal on to the ranks. After SIGINT rank 0 says `error: interrupted` and the --resume
    command; a SIGTERM ends the ranks without a word, so the launcher says it. This used to be
    a SignalException traceback and exit 1."""
    if sig != signal.SIGINT:
        name = signal.Signals(sig).name
        print(
            f"error: stopped by {name}; the ranks were stopped with it. Resume from the last "
            "checkpoint with --resume RUN_DIR",
            file=sys.stderr,
        )
    return 128 + int(sig)


def _quiet_elastic_logs() -> None:
    """torchelastic's loggers each set their own level (LOGLEVEL, default WARNING), so the
    parent's level alone left lines such as "Received 2 death signal" on stderr."""
    import torch.distributed.elastic.agent.server.api  # noqa: F401  (creates its loggers)

    prefix = "torch.distributed.elastic"
    for name in [prefix, *logging.root.manager.loggerDict]:
        if name == prefix or name.startswith(prefix + "."):
            logging.getLogger(name).setLevel(logging.CRITICAL)
