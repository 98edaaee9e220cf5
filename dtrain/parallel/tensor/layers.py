"""Tensor-parallel layers: one weight matrix cut across the ranks of a group (Megatron-LM,
Shoeybi et al., 2019).

Each layer builds the whole torch layer from the current random state and keeps its own slice,
so ranks seeded alike hold the slices of exactly the layer one process would have built with
that seed (and a group of one rank is that layer). `from_linear` / `from_embedding` cut an
existing layer instead.

A column-parallel layer followed by a row-parallel one needs no communication in between (the
MLP of a transformer: one allreduce forward, one backward)::

    up = ColumnParallelLinear(d, 4 * d, gather_output=False, group=tp)
    down = RowParallelLinear(4 * d, d, input_is_parallel=True, group=tp)
    y = down(F.gelu(up(x)))          # x and y whole on every rank of tp
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtrain.errors import ConfigError
from dtrain.parallel.tensor.mappings import (bounds, copy_to_region, gather_from_region, group_rank, group_size,
                                             reduce_from_region, scatter_to_region)


def _cut(cls, layer: nn.Module, *how) -> nn.Module:
    """A `cls` holding this rank's copy of `layer`'s slice, without building a layer of its own."""
    self = cls.__new__(cls)
    nn.Module.__init__(self)
    self._take(layer, *how)
    return self


def _share(n: int, group, what: str):
    size = group_size(group)
    if n < size:
        raise ConfigError(f"{what}={n} cannot be split across {size} tensor-parallel ranks: every rank needs at "
                          f"least one; use a group of at most {n} ranks")
    return bounds(n, size, group_rank(group))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows (the columns of y) cut across the ranks of `group`.

    Args:
        in_features, out_features, bias: as nn.Linear.
        gather_output: True: every rank gets the whole y (an allgather); False: each keeps its
            slice of y's last dimension, for a RowParallelLinear(input_is_parallel=True) next.
        group: the tensor-parallel ranks (None: the world).

    Input: the whole x on every rank. Parameters: weight (out_features / ranks, in_features),
    bias (out_features / ranks); with an uneven split the first ranks hold one row more.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = True,
                 group=None, device=None, dtype=None):
        super().__init__()
        full = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._take(full, gather_output, group)

    @classmethod
    def from_linear(cls, linear: nn.Linear, gather_output: bool = True, group=None) -> "ColumnParallelLinear":
        """This rank's slice of an existing nn.Linear (copied; `linear` is left as it is)."""
        return _cut(cls, linear, gather_output, group)

    def _take(self, full: nn.Linear, gather_output: bool, group) -> None:
        self.in_features, self.out_features = full.in_features, full.out_features
        self.gather_output, self.group = bool(gather_output), group
        self.lo, self.hi = _share(full.out_features, group, "out_features")
        self.weight = nn.Parameter(full.weight.detach()[self.lo:self.hi].clone())
        self.bias = nn.Parameter(full.bias.detach()[self.lo:self.hi].clone()) if full.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_region(x, self.group), self.weight, self.bias)
        return gather_from_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (this rank: {self.lo}:{self.hi}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns (the last dimension of x) cut across the ranks.

    Args:
        in_features, out_features, bias: as nn.Linear. The bias is whole on every rank and
            added once, after the partial products are summed.
        input_is_parallel: True: x is already this rank's slice of its last dimension (the
            output of a ColumnParallelLinear(gather_output=False)); False: x is whole and each
            rank takes its slice.
        group: the tensor-parallel ranks (None: the world).

    Output: the whole y on every rank (one allreduce).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = False,
                 group=None, device=None, dtype=None):
        super().__init__()
        full = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._take(full, input_is_parallel, group)

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_is_parallel: bool = False, group=None) -> "RowParallelLinear":
        """This rank's slice of an existing nn.Linear (copied; `linear` is left as it is)."""
        return _cut(cls, linear, input_is_parallel, group)

    def _take(self, full: nn.Linear, input_is_parallel: bool, group) -> None:
        self.in_features, self.out_features = full.in_features, full.out_features
        self.input_is_parallel, self.group = bool(input_is_parallel), group
        self.lo, self.hi = _share(full.in_features, group, "in_features")
        self.weight = nn.Parameter(full.weight.detach()[:, self.lo:self.hi].clone())
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.group)
        elif x.shape[-1] != self.hi - self.lo:
            raise ConfigError(f"RowParallelLinear(input_is_parallel=True) on rank slice {self.lo}:{self.hi} of "
                              f"{self.in_features} inputs got a last dimension of {x.shape[-1]}, not "
                              f"{self.hi - self.lo}: feed it a ColumnParallelLinear(gather_output=False) output "
                              "over the same group, or set input_is_parallel=False")
        y = reduce_from_region(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (this rank: {self.lo}:{self.hi}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """An embedding table whose rows (the vocabulary) are cut across the ranks: each rank looks
    up the ids it holds, writes zeros for the others, and one allreduce assembles the result.

    Args:
        num_embeddings, embedding_dim, padding_idx: as nn.Embedding.
        group: the tensor-parallel ranks (None: the world).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None, group=None,
                 device=None, dtype=None):
        super().__init__()
        full = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self._take(full, group)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group=None) -> "VocabParallelEmbedding":
        """This rank's rows of an existing nn.Embedding (copied)."""
        return _cut(cls, embedding, group)

    def _take(self, full: nn.Embedding, group) -> None:
        if full.max_norm is not None or full.sparse:
            raise ConfigError("VocabParallelEmbedding does not support max_norm or sparse=True embeddings")
        self.num_embeddings, self.embedding_dim = full.num_embeddings, full.embedding_dim
        self.padding_idx, self.group = full.padding_idx, group
        self.lo, self.hi = _share(full.num_embeddings, group, "num_embeddings")
        self.weight = nn.Parameter(full.weight.detach()[self.lo:self.hi].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"VocabParallelEmbedding takes integer ids (int64 or int32), got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ConfigError(f"ids must lie in [0, {self.num_embeddings}), got values from {int(ids.min())} to "
                              f"{int(ids.max())}")
        if group_size(self.group) == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        outside = (ids < self.lo) | (ids >= self.hi)
        local = (ids - self.lo).masked_fill(outside, 0)
        pad = self.padding_idx - self.lo if self.padding_idx is not None and self.lo <= self.padding_idx < self.hi \
            else None
        out = F.embedding(local, self.weight, pad)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (this rank: rows {self.lo}:{self.hi})"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))
