"""A training sampler whose order and augmentation depend only on (seed, epoch, position).

That makes runs repeatable whatever the number of workers, and lets an interrupted run resume in
the middle of an epoch with exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside distributed training."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``range(size)`` with ``seed + epoch`` and yields keys ``epoch * size + index``.

    Lightning calls :meth:`set_epoch` before each epoch. The dataset decodes a key into its sample
    index and seeds that sample's augmentation from the key. Under DDP each rank takes every
    world-size-th position of the same order (trainer ``use_distributed_sampler: false``).
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """Leave out the first ``samples`` of the next pass (they were trained on before a resume)."""
        self.skip = samples

    def __iter__(self) -> Iterator[int]:
        rank, world = distributed_rank()
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order[: len(self) * world][rank::world]
        skip, self.skip = self.skip, 0
        return iter((order[skip:] + self.epoch * self.size).tolist())

    def __len__(self) -> int:
        return self.size // distributed_rank()[1]
