"""The four conjugate autograd mappings tensor-parallel layers are built from. Each is named
after what it does in both directions; the backward of one is the forward of its partner:

    copy_to_region      forward: identity              backward: allreduce (sum)
    reduce_from_region  forward: allreduce (sum)       backward: identity
    scatter_to_region   forward: keep my slice of the last dim   backward: allgather along it
    gather_from_region  forward: allgather along the last dim    backward: keep my slice

"Region" is the ranks of `group` (None: the world). A group of one rank makes each of them the
identity, with no communication. The last dimension is cut as torch.tensor_split cuts it: the
first `n % size` ranks get one more column.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

import dtrain
from dtrain.errors import ConfigError


def _world() -> None:
    # as the strategies do: a layer made before dtrain.init() joins the job dtrain-run started
    if not dtrain.is_initialized():
        dtrain.init()


def group_size(group) -> int:
    if group is None:
        _world()
        return dtrain.world_size()
    return group.size


def group_rank(group) -> int:
    if group is None:
        _world()
        return dtrain.rank()
    if group.rank < 0:
        raise ConfigError(f"rank {dtrain.rank()} is not in the tensor-parallel group {group.ranks}: give each rank "
                          "the group it belongs to")
    return group.rank


def split_sizes(n: int, parts: int) -> List[int]:
    """How many of `n` columns (or vocabulary rows) each of `parts` ranks holds."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def bounds(n: int, parts: int, index: int) -> Tuple[int, int]:
    """[start, end) of rank `index`'s share of `n`."""
    sizes = split_sizes(n, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


def _allreduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()
    return dtrain.allreduce(out, group=group)


def _slice_last(x: torch.Tensor, group) -> torch.Tensor:
    lo, hi = bounds(x.shape[-1], group_size(group), group_rank(group))
    return x[..., lo:hi].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    size, rank = group_size(group), group_rank(group)
    if x.dim() == 0:
        raise ConfigError("gather_from_region needs a tensor with a last dimension to gather along, got a 0-d one")
    # allgather concatenates along dim 0: bring the last dimension there and back
    front = x.movedim(-1, 0).contiguous()
    whole = dtrain.allgather(front, group=group)
    if split_sizes(whole.shape[0], size)[rank] != x.shape[-1]:
        raise ConfigError(f"gather_from_region: rank {dtrain.rank()} holds {x.shape[-1]} of {whole.shape[0]} columns, "
                          f"but a split over {size} ranks gives it {split_sizes(whole.shape[0], size)[rank]}: each "
                          "rank must hold its torch.tensor_split share of the last dimension")
    return whole.movedim(0, -1)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _allreduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _allreduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _slice_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _slice_last(grad, ctx.group), None


def copy_to_region(x: torch.Tensor, group: Optional["dtrain.Group"] = None) -> torch.Tensor:
    """Forward: `x` unchanged. Backward: the gradients of every rank of `group`, summed.

    Put it where a tensor every rank holds enters rank-local computation (the input of a
    column-parallel layer): each rank's branch contributes part of the input's gradient.
    """
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Optional["dtrain.Group"] = None) -> torch.Tensor:
    """Forward: `x` summed over the ranks of `group`. Backward: the gradient unchanged.

    Example (2 ranks)::

        y = reduce_from_region(torch.full((2,), float(dtrain.rank() + 1)))   # both: tensor([3., 3.])
    """
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: Optional["dtrain.Group"] = None) -> torch.Tensor:
    """Forward: this rank's slice of `x`'s last dimension. Backward: the slices' gradients
    gathered back into the whole.

    Example (2 ranks)::

        scatter_to_region(torch.arange(5.0))   # rank 0: tensor([0., 1., 2.])   rank 1: tensor([3., 4.])
    """
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group: Optional["dtrain.Group"] = None) -> torch.Tensor:
    """Forward: every rank's `x` concatenated along the last dimension, in rank order.
    Backward: this rank's slice of the gradient.

    Example (2 ranks)::

        gather_from_region(torch.full((1, 2), float(dtrain.rank())))   # both: tensor([[0., 0., 1., 1.]])
    """
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group)
