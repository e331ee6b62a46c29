"""A resumable, infinite, shuffled batch sampler.

Epoch ``e`` uses the permutation drawn from ``seed + e``; the only state is how many batches have
been handed out, so resuming from a checkpoint replays exactly the same batches as an uninterrupted
run, whatever the number of data-loader workers.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(f"dataset has {num_samples} samples, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks); lower batch_size")
        self.n, self.bs, self.seed = num_samples, batch_size, seed
        self.rank, self.world = rank, world_size
        self.start_batch = start_batch
        self.per_epoch = num_samples // (batch_size * world_size)  # drop the ragged tail

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch
        while True:
            epoch, i = divmod(b, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            g = self.bs * self.world
            start = i * g + self.rank * self.bs
            yield perm[start : start + self.bs].tolist()
            b += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs this for progress estimates
        return 2**62
