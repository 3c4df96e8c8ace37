"""Which process am I among those ``torchrun`` started: rank, world size, joining and leaving the
process group, barrier and sum. One process (no ``WORLD_SIZE`` > 1) never touches
torch.distributed, so single-process runs need no launcher and create no group.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from memkern.errors import ConfigError, DistributedError, MemkernError

TIMEOUT_ENV = "MEMKERN_DIST_TIMEOUT"
# Longest wait, in seconds, for joining the group and for any collective: a rank that died or
# hangs makes the others fail after this instead of waiting forever. Collectives come once per
# chunk, so it must exceed the longest chunk on the slowest rank; override with TIMEOUT_ENV.
DEFAULT_TIMEOUT = 600


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` in ``0..size-1``, ``local_rank`` on its machine; ``device``
    is where collectives put their tensors (CPU under gloo, the rank's GPU under nccl)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> World:
        """Read ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` as torchrun sets them; none -> one
        process."""
        size = _env_int("WORLD_SIZE", 1)
        if size <= 1:
            return cls()
        rank, local = _env_int("RANK", None), _env_int("LOCAL_RANK", 0)
        if rank is None or not 0 <= rank < size:
            raise ConfigError(f"WORLD_SIZE={size} but RANK={os.environ.get('RANK')!r} is not in "
                              f"0..{size - 1}; launch with `torchrun --nproc-per-node N -m "
                              "memkern.cli ...`, or unset WORLD_SIZE for one process")
        return cls(rank=rank, size=size, local_rank=local)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """The device this rank computes on: ``cuda`` becomes ``cuda:local_rank`` when several
        processes share a machine's GPUs."""
        if device.type == "cuda" and self.size > 1 and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.size > 1:
            self._collective(dist.barrier)

    def sum(self, value: int | float) -> int | float:
        """``value`` summed over ranks (every rank gets the total; float64 for a float)."""
        if self.size == 1:
            return value
        kind = float if isinstance(value, float) else int
        t = torch.tensor([value], dtype=torch.float64 if kind is float else torch.int64,
                         device=self.device)
        self._collective(lambda: dist.all_reduce(t))
        return kind(t.item())

    def _collective(self, call) -> None:
        with self.peers():
            call()

    @contextmanager
    def peers(self) -> Iterator[None]:
        """Collectives in the block (DistributedDataParallel's inside a backward among them)
        that fail because a peer died or timed out raise one DistributedError."""
        try:
            yield
        except RuntimeError as e:  # a peer died (connection closed) or the timeout passed
            if self.size == 1 or isinstance(e, MemkernError):  # not a peer's failure
                raise
            raise DistributedError(
                f"rank {self.rank} of {self.size}: another rank stopped or did not arrive within "
                f"{TIMEOUT_ENV}={timeout_seconds()} s ({_first_line(e)}); rerun to resume, "
                "finished work is kept") from e


def timeout_seconds() -> int:
    value = _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    if value < 1:
        raise ConfigError(f"{TIMEOUT_ENV}={value}: give a positive number of seconds")
    return value


@contextmanager
def joined(world: World, device: torch.device) -> Iterator[World]:
    """Join the process group for the block (gloo for CPU work, nccl for CUDA ``device``) and
    leave it after; with one process, yield ``world`` unchanged and touch nothing."""
    if world.size == 1:
        yield world
        return
    seconds = timeout_seconds()
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timedelta(seconds=seconds), device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))
    except RuntimeError as e:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise DistributedError(
            f"rank {world.rank} of {world.size} could not join the process group at {where} "
            f"within {TIMEOUT_ENV}={seconds} s ({_first_line(e)}); start all {world.size} "
            "ranks with the same MASTER_ADDR/MASTER_PORT (torchrun does)") from e
    try:
        yield replace(world, device=device)
    finally:
        dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _env_int(name: str, default: int | None) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer")
