"""The strategy base: one shape for every way of training, so switching is one line.

    strategy = dtrain.AllReduceStrategy()          # or LocalStrategy(), ...
    model, optimizer = strategy.prepare(model, optimizer)
    loader = strategy.distribute(dataset, batch_size=64)
    ...
    strategy.save("ckpt/", model=model, optimizer=optimizer, step=step)

Subclasses supply `prepare` and, when they communicate, `_reduce_scalars`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

import torch

import dtrain
from dtrain.parallel import checkpoint
from dtrain.parallel.sharding import shard_loader
from dtrain.errors import ConfigError


class Strategy:
    """What every strategy offers. Not used directly: pick LocalStrategy, AllReduceStrategy, ..."""

    def __init__(self, group: Optional["dtrain.Group"] = None):
        self._group = group

    # ---- who am I
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes (rank 0)."""
        return self.rank == 0

    # ---- training
    def prepare(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
                ) -> Tuple[torch.nn.Module, Optional[torch.optim.Optimizer]]:
        raise NotImplementedError(f"{type(self).__name__} does not implement prepare(): use LocalStrategy, "
                                  "AllReduceStrategy or another concrete strategy")

    @contextlib.contextmanager
    def no_sync(self, model: Optional[torch.nn.Module] = None):
        """Backward passes inside skip communication; gradients accumulate locally and the
        next backward outside reduces their sum (as DDP's no_sync)."""
        yield

    def synchronize(self) -> None:
        """Waits for every gradient reduction in flight (backward already does this)."""

    def distribute(self, data, batch_size: Optional[int] = None, shuffle: Optional[bool] = None,
                   seed: int = 0, drop_last: bool = False, **loader_kwargs):
        """This rank's share of `data`: a torch Dataset (give batch_size), a DataLoader
        (rebuilt with a sharding sampler) or a dtrain.data.TFRecordDataset (sharded by
        record or by file); every rank gets the same number of batches.

        shuffle defaults to True for a Dataset and to the DataLoader's own choice;
        the permutation changes every epoch and is the same on every rank.
        """
        from dtrain.data.dataset import TFRecordDataset
        if isinstance(data, TFRecordDataset):  # shards itself: by record with index files, by file without
            if data._shard is not None:
                if data._shard[:2] != (self.rank, self.world_size):
                    raise ConfigError(f"the dataset is sharded for rank {data._shard[0]} of {data._shard[1]}, but this "
                                      f"strategy runs rank {self.rank} of {self.world_size}; leave shard() to distribute()")
                return data
            return data.shard(self.rank, self.world_size, drop_last=drop_last)
        if hasattr(data, "shard") and callable(data.shard) and not isinstance(data, torch.utils.data.Dataset):
            return data.shard(self.rank, self.world_size)
        return shard_loader(data, self.rank, self.world_size, batch_size, shuffle, seed, drop_last,
                            **loader_kwargs)

    def barrier(self) -> None:
        """Returns once every rank has called it."""

    def reduce_metrics(self, metrics: Dict[str, Any]) -> Dict[str, float]:
        """Averages each number (float, int or one-element tensor) across ranks; same keys on every rank.

        Example::

            strategy.reduce_metrics({"loss": loss.item(), "acc": acc})   # {"loss": 0.31, "acc": 0.93}
        """
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        values = self._reduce_scalars(values) / self.world_size
        return dict(zip(keys, values.tolist()))

    def _reduce_scalars(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def _gather_rng(self) -> list:
        return [checkpoint.rng_state()]

    # ---- checkpoints
    def save(self, path: str, model: Optional[torch.nn.Module] = None,
             optimizer: Optional[torch.optim.Optimizer] = None, step: Optional[int] = None,
             shard: Optional[Tuple[int, int]] = None, **extra) -> str:
        """Writes model, optimizer, every rank's RNG states, `step` and `extra` to `path`
        atomically (rank 0 writes; the others wait until it is on disk). Returns the file.

        shard=(index, count): this rank's part of a model split across ranks (tensor parallel),
        written to its own file (checkpoint-shard{index}-of-{count}.pt); rank 0 of each
        data-parallel group writes its shard. A crash during the save leaves the previous
        checkpoint at `path` loadable.
        """
        rngs = self._gather_rng()
        file = checkpoint.resolve_file(path) if shard is None else checkpoint.shard_file(path, *shard)
        if self.is_main:
            payload = {
                "dtrain_format": checkpoint.FORMAT,
                "world_size": self.world_size,
                "shard": tuple(shard) if shard is not None else None,
                "model": model.state_dict() if model is not None else None,
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "step": step,
                "rng": rngs,
                "extra": extra,
            }
            checkpoint.atomic_write(file, checkpoint.serialize(payload))
        self._saved_barrier(shard)
        return file

    def _saved_barrier(self, shard) -> None:
        # Shards are written by several writers, one per group: wait for all of them.
        if shard is not None and dtrain.is_initialized():
            dtrain.barrier()
        else:
            self.barrier()

    def load(self, path: str, model: Optional[torch.nn.Module] = None,
             optimizer: Optional[torch.optim.Optimizer] = None, strict: bool = True,
             shard: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
        """Restores what save() wrote into `model` and `optimizer` (and this rank's RNG states);
        `shard` as given to save().

        Returns ``{"step": step, **extra}``.
        """
        file = checkpoint.resolve_file(path) if shard is None else checkpoint.shard_file(path, *shard)
        payload = checkpoint.read(file)
        checkpoint.check_shard(payload, file, shard)
        return checkpoint.restore(payload, self.rank, model, optimizer, strict=strict)


class GroupStrategy(Strategy):
    """A strategy whose ranks are those of a group (None: the world): rank, size, barrier and
    metric averaging all go through it."""

    @property
    def rank(self) -> int:
        return self._group.rank if self._group is not None else dtrain.rank()

    @property
    def world_size(self) -> int:
        return self._group.size if self._group is not None else dtrain.world_size()

    def barrier(self) -> None:
        dtrain.barrier(group=self._group)

    def _reduce_scalars(self, values: torch.Tensor) -> torch.Tensor:
        return dtrain.allreduce(values, group=self._group)


class LocalStrategy(Strategy):
    """One process, the same API: the default when the world size is 1."""

    def prepare(self, model, optimizer=None):
        return model, optimizer


__all__ = ["Strategy", "GroupStrategy", "LocalStrategy"]
