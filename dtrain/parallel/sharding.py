"""Splitting a dataset across ranks so that every rank runs the same number of steps.

A rank that ran one step fewer than the others would leave them waiting in an
allreduce until the timeout; so, like torch's DistributedSampler, the index list
is padded (by repeating its start) to a multiple of the world size, or cut to
one when ``drop_last=True``.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from dtrain.errors import ConfigError


class ShardedSampler(Sampler):
    """Yields this rank's share of ``range(len(dataset))``: the same count on every rank.

    With ``shuffle=True`` the permutation is drawn from ``seed + epoch``, so every
    rank agrees on it. Each pass uses the current epoch and then advances it, so a
    loop over epochs reshuffles without help; ``set_epoch(e)`` (as with
    DistributedSampler) sets the epoch the next pass uses.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside a world of size {world_size}")
        if dataset_len == 0:
            raise ConfigError("the dataset is empty: there is nothing to shard")
        if drop_last and dataset_len < world_size:
            raise ConfigError(f"drop_last=True leaves no sample per rank: the dataset holds {dataset_len} "
                              f"samples for {world_size} ranks; use drop_last=False")
        self.n, self.rank, self.world = dataset_len, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.per_rank = dataset_len // world_size if drop_last else math.ceil(dataset_len / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank

    def indices(self, epoch: int) -> list:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        if total > self.n:
            order += (order * math.ceil(total / self.n))[: total - self.n]
        return order[:total][self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self.epoch += 1
        return iter(self.indices(epoch))


def shard_loader(data, rank: int, world_size: int, batch_size: Optional[int], shuffle: Optional[bool],
                 seed: int, drop_last: bool, **loader_kwargs) -> DataLoader:
    """A DataLoader over this rank's shard of `data` (a Dataset or a DataLoader to rebuild)."""
    if isinstance(data, DataLoader):
        loader = data
        if loader.batch_size is None:
            raise ConfigError("distribute() cannot re-shard a DataLoader built with batch_sampler= or "
                              "batch_size=None: pass the Dataset and batch_size instead")
        if shuffle is None:
            shuffle = isinstance(loader.sampler, RandomSampler)
        kwargs = dict(batch_size=batch_size or loader.batch_size, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers)
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs.update(loader_kwargs)
        dataset = loader.dataset
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        dataset = data
        kwargs = dict(batch_size=batch_size or 1)
        kwargs.update(loader_kwargs)
        if shuffle is None:
            shuffle = True
    else:
        raise ConfigError(f"distribute() takes a torch Dataset, a DataLoader or a dtrain dataset, got "
                          f"{type(data).__name__}")
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise ConfigError("distribute() cannot shard an IterableDataset by index: shard it inside the "
                          "dataset with dtrain.rank()/dtrain.world_size(), or use a map-style Dataset")
    sampler = ShardedSampler(len(dataset), rank, world_size, shuffle=bool(shuffle), seed=seed,
                             drop_last=drop_last)
    return DataLoader(dataset, sampler=sampler, **kwargs)


__all__ = ["ShardedSampler", "shard_loader"]
