"""hvd.SyncBatchNorm: batch normalisation whose statistics cover every rank's batch."""

from __future__ import annotations

import torch

from dtrain.horovod.basics import Sum, size
from dtrain.horovod.ops import allreduce


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over N-D input (N, C, ...) whose training-mode mean and variance are those of
    the whole job's batch: per-channel sums, sums of squares and counts are added across
    ranks in one allreduce (differentiable, so gradients flow through the statistics).
    Evaluation mode and one rank behave as torch.nn.BatchNorm.

    Example::

        model.bn = hvd.SyncBatchNorm(64)     # in place of torch.nn.BatchNorm2d(64)
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D input")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or size() == 1:
            return super().forward(input)
        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        local = torch.cat([x.sum(dims), (x * x).sum(dims),
                           torch.full((1,), float(input.numel() // max(c, 1)), dtype=x.dtype)])
        total = allreduce(local, op=Sum, name="sync_batch_norm")
        n = total[-1]
        if float(n) < 2:
            raise ValueError(f"SyncBatchNorm needs more than 1 value per channel across all ranks, got {int(n)}")
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = [1, c] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


__all__ = ["SyncBatchNorm"]
