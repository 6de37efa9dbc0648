"""Several processes for one stage: ``torchrun --nproc-per-node N -m pipeline train|embed|retrain ...``.

torchrun (PyTorch's launcher; it runs under SLURM and Kubernetes too) starts N copies of the command and tells
each its place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address).
:func:`setup` joins them into one process group (NCCL between GPUs, gloo on CPUs) and :func:`teardown` leaves it.
While a group is up, :func:`current` says where this process stands; without one (a plain ``python -m
pipeline``) it is rank 0 of 1 and every helper here does nothing, so single-process runs are unchanged.

How the stages divide the work:

* **training** (:func:`pipeline.model.train.fit`): DistributedDataParallel. Every rank draws the same global
  order of images (the same seeded sampler) and takes its own share of it (:class:`RankShare`), in batches of
  ``--batch-size / N``, so one step sees the same number of images as a single process and the gradients,
  averaged over ranks, are those of the whole batch;
* **the attention pass** (:mod:`pipeline.model.embed`): the pass's shards are dealt out by rank; each rank
  writes its own into the run's shard folder and rank 0 merges them into ``attention.npz``;
* **everything that writes the run** (checkpoints, metrics, run state) happens on rank 0 only
  (:func:`on_main`); the others wait and then read what it wrote. The run folder must therefore be on storage
  every node sees (a shared file system), as for any multi-node job.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from pipeline.core.world import World, launched

log = logging.getLogger(__name__)
# How long a rank waits for the others at a barrier: rank 0 alone evaluates a model or merges an attention
# file of a million images while the rest wait, which can take far longer than torch's 10-minute default.
GROUP_TIMEOUT = timedelta(hours=2)

T = TypeVar("T")


def current() -> World:
    """Where this process stands in the group :func:`setup` joined; rank 0 of 1 when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str) -> World:
    """Join the process group torchrun prepared, when it started several processes; returns this one's place.

    NCCL when the stage runs on CUDA (each process on the GPU numbered by its local rank), gloo on CPU.
    """
    world = launched()
    if not world.distributed:
        return world
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=GROUP_TIMEOUT)
    log.info("process %d of %d (%s)", world.rank, world.size, dist.get_backend())
    return world


def teardown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here."""
    if current().distributed:
        dist.barrier()


def on_main(work: Callable[[], T]) -> T | None:
    """Run ``work`` on rank 0 only (what writes the run); every rank returns once it is done.

    An error on rank 0 ends that process, and torchrun then stops the others: no rank waits forever.
    """
    result = work() if current().is_main else None
    barrier()
    return result


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others: rank 0 does the writing (a dataset manifest,
    propagated scores), the rest find it done and only read it."""
    world = current()
    if world.distributed and not world.is_main:
        dist.barrier()
    yield
    if world.distributed and world.is_main:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank: lets every rank make the same choice (e.g. skip a step together)."""
    if not current().distributed:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def summed(*values: float) -> list[float]:
    """``values`` summed over every rank (e.g. an epoch's loss total and image count)."""
    if not current().distributed:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def placement(device: torch.device) -> str:
    """The device type, with the number of processes under torchrun: what an epoch checkpoint must match to
    be resumed (a 2-process run's random states and batches are not a 1-process run's)."""
    world = current()
    return f"{device.type}x{world.size}" if world.distributed else device.type


def block_of(count: int, world: World) -> range:
    """``world``'s rank's contiguous block of ``count`` work items (the attention pass's shards): near-equal
    blocks in rank order, so the blocks laid end to end are the single-process order."""
    return range(count * world.rank // world.size, count * (world.rank + 1) // world.size)


def share_of_batch(batch_size: int, world: World) -> int:
    """Each rank's batch: ``batch_size`` split evenly, so one step of all ranks sees a whole batch."""
    if batch_size % world.size:
        log.warning("--batch-size %d is not a multiple of the %d processes; each takes %d per step",
                    batch_size, world.size, math.ceil(batch_size / world.size))
    return max(1, math.ceil(batch_size / world.size))


class RankShare(Sampler[int]):
    """This rank's share of ``sampler``'s draws: every ``size``-th index starting at ``rank``.

    Every rank iterates the same seeded ``sampler`` and so sees the same global order; the order is padded by
    repeating its first draws to a multiple of ``size``, so all ranks take the same number of steps (DDP
    hangs when one rank stops early). Its ``generator`` is the wrapped sampler's, for checkpoints to save.
    """

    def __init__(self, sampler: Sampler[int], world: World) -> None:
        self.sampler = sampler
        self.world = world

    @property
    def generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        order += order[:len(self) * self.world.size - len(order)]
        return iter(order[self.world.rank::self.world.size])

    def __len__(self) -> int:
        assert isinstance(self.sampler, Sized)
        return math.ceil(len(self.sampler) / self.world.size)
