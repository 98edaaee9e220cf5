"""Cross-entropy over logits whose vocabulary dimension is cut across the ranks of a group, so
the whole (tokens x vocabulary) logits never exist on one rank.

Per token, with this rank's logits z over its vocabulary slice:
    m = max over all ranks of max(z)             (one allreduce, max; for stability)
    s = sum over all ranks of sum(exp(z - m))     (one allreduce, sum)
    t = z[target] - m on the rank holding the target, 0 elsewhere, summed (one allreduce)
    loss = log(s) - t
and the gradient with respect to z is softmax(z) - onehot(target) on each rank's slice, which
needs no communication.
"""

from __future__ import annotations

import torch

import dtrain
from dtrain.errors import ConfigError
from dtrain.parallel.tensor.mappings import bounds, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab, group):
        lo, hi = bounds(vocab, group_size(group), group_rank(group))
        z = logits.float()
        m = z.max(dim=-1).values
        dtrain.allreduce(m, op="max", group=group)
        z = z - m.unsqueeze(-1)
        inside = (target >= lo) & (target < hi)
        local = (target - lo).masked_fill(~inside, 0)
        picked = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
        exp = z.exp()
        s = exp.sum(dim=-1)
        both = torch.stack([s, picked])
        dtrain.allreduce(both, group=group)
        s, picked = both[0], both[1]
        softmax = exp.div_(s.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, inside)
        ctx.dtype = logits.dtype
        return s.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, local, inside = ctx.saved_tensors
        g = softmax.clone()
        rows = g.view(-1, g.shape[-1])
        idx = torch.arange(rows.shape[0])
        rows[idx, local.view(-1)] -= inside.view(-1).to(g.dtype)
        return (g * grad.unsqueeze(-1)).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None,
                                 reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of `logits` (..., this rank's vocabulary slice) against `target` (...),
    equal to F.cross_entropy on the gathered logits.

    Args:
        logits: this rank's slice of the last dimension, as a ColumnParallelLinear with
            gather_output=False leaves it (sizes split as torch.tensor_split does).
        target: class indices into the whole vocabulary, the same on every rank.
        group: the tensor-parallel ranks (None: the world).
        reduction: "mean" (over targets that are not ignore_index), "sum" or "none".
        ignore_index: targets with this value add nothing to the loss or the gradient.

    Returns:
        The loss, the same on every rank of `group`.

    Example (2 ranks, vocabulary of 5)::

        logits = head(x)                                   # rank 0: (..., 3)   rank 1: (..., 2)
        loss = vocab_parallel_cross_entropy(logits, y)     # both: F.cross_entropy(all logits, y)
    """
    if reduction not in ("mean", "sum", "none"):
        raise ConfigError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if target.shape != logits.shape[:-1]:
        raise ConfigError(f"target of shape {tuple(target.shape)} does not match logits of shape "
                          f"{tuple(logits.shape)}: it needs the logits' shape without the last (vocabulary) dimension")
    if target.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"target must hold class indices (int64), got {target.dtype}")
    size = group_size(group)
    shares = torch.tensor([logits.shape[-1]], dtype=torch.int64)
    if size > 1:
        shares = dtrain.allgather(shares, group=group)
    vocab = int(shares.sum())
    keep = target != ignore_index
    if keep.any() and (int(target[keep].min()) < 0 or int(target[keep].max()) >= vocab):
        raise ConfigError(f"targets must lie in [0, {vocab}) (or be ignore_index={ignore_index}), got values from "
                          f"{int(target[keep].min())} to {int(target[keep].max())}")
    safe = target.masked_fill(~keep, 0).long()
    if size == 1:
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), safe.reshape(-1),
                                                   reduction="none").reshape(target.shape)
    else:
        want = bounds(vocab, size, group_rank(group))
        if want[1] - want[0] != logits.shape[-1]:
            raise ConfigError(f"rank {dtrain.rank()} holds {logits.shape[-1]} of {vocab} vocabulary logits but a split "
                              f"over {size} ranks gives it {want[1] - want[0]}: use the output of a "
                              "ColumnParallelLinear(gather_output=False) over the same group")
        losses = _VocabParallelCrossEntropy.apply(logits, safe, vocab, group)
    losses = losses.masked_fill(~keep, 0.0)
    if reduction == "none":
        return losses.to(logits.dtype)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / keep.sum().clamp(min=1)
