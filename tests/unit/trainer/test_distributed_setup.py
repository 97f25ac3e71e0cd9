"""Who says a setup error of a data-parallel run: without a process group or a GPU."""

from __future__ import annotations

import os
from unittest import mock

import pytest

from rnnserve.trainer import distributed
from rnnserve.trainer.distributed import RankError, joined, speaks
from rnnserve.trainer.errors import TrainerError

RANK1 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": "1"}  # fmt: skip


def _error_joining_on(gpus: int) -> TrainerError:
    with (
        mock.patch.dict(os.environ, RANK1),
        mock.patch.object(distributed.torch.cuda, "is_available", return_value=gpus > 0),
        mock.patch.object(distributed.torch.cuda, "device_count", return_value=gpus),
        pytest.raises(TrainerError) as caught,
        joined("cuda"),
    ):
        pytest.fail("no process group forms without a GPU for this rank")
    return caught.value


def test_a_rank_past_the_gpu_count_says_so_itself() -> None:
    """`--nproc 2 --device cuda` on one GPU: rank 0 has its GPU, only rank 1 fails. Said by
    rank 0 alone (a plain TrainerError), the run exited 2 without a word."""
    with mock.patch.dict(os.environ, RANK1):
        exc = _error_joining_on(gpus=1)
        assert isinstance(exc, RankError)
        assert speaks(exc)
    assert str(exc) == (
        "rank 1 needs GPU 1 but 1 are visible; lower --nproc (torchrun: --nproc_per_node)"
    )


def test_no_gpu_at_all_is_said_once_by_rank_0() -> None:
    with mock.patch.dict(os.environ, RANK1):
        exc = _error_joining_on(gpus=0)
        assert not isinstance(exc, RankError)
        assert not speaks(exc)  # every rank meets it; rank 0 says it
