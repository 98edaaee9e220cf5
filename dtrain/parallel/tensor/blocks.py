"""A transformer's two tensor-parallel blocks, built from the layers: each holds a share of the
hidden units (MLP) or of the heads (attention), takes the whole input on every rank and returns
the whole output, with one allreduce forward and one backward.

Built under the same seed, a block's slices are those of the unsplit block with the same
structure (MLP: Linear(d, hidden), activation, Linear(hidden, d); attention: Linear(d, d) for
each of q, k, v, then Linear(d, d) out, created in that order).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtrain.errors import ConfigError
from dtrain.parallel.tensor.layers import ColumnParallelLinear, RowParallelLinear
from dtrain.parallel.tensor.mappings import copy_to_region, group_size


class ParallelMLP(nn.Module):
    """Linear(d, hidden) -> activation -> Linear(hidden, d), the hidden units cut across `group`."""

    def __init__(self, d: int, hidden: int, activation=F.gelu, bias: bool = True, group=None):
        super().__init__()
        self.up = ColumnParallelLinear(d, hidden, bias=bias, gather_output=False, group=group)
        self.down = RowParallelLinear(hidden, d, bias=bias, input_is_parallel=True, group=group)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(x)))


class ParallelSelfAttention(nn.Module):
    """Multi-head self-attention over (batch, time, d) with the heads cut across `group` (each
    rank computes heads/ranks whole heads; `heads` must divide by the group's size)."""

    def __init__(self, d: int, heads: int, causal: bool = True, bias: bool = True, group=None):
        super().__init__()
        size = group_size(group)
        if d % heads:
            raise ConfigError(f"d={d} must divide into heads={heads} heads of equal width")
        if heads % size:
            raise ConfigError(f"heads={heads} cannot be shared evenly by {size} tensor-parallel ranks: use a head "
                              f"count divisible by {size}, or a group of a size that divides {heads}")
        self.heads, self.local_heads, self.head_dim = heads, heads // size, d // heads
        self.causal, self.group = causal, group
        self.q = ColumnParallelLinear(d, d, bias=bias, gather_output=False, group=group)
        self.k = ColumnParallelLinear(d, d, bias=bias, gather_output=False, group=group)
        self.v = ColumnParallelLinear(d, d, bias=bias, gather_output=False, group=group)
        self.out = RowParallelLinear(d, d, bias=bias, input_is_parallel=True, group=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # one copy_to_region for q, k and v: their input gradients are summed before the one allreduce
        x = copy_to_region(x, self.group)

        def heads(layer):
            return F.linear(x, layer.weight, layer.bias).view(b, t, self.local_heads, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q), heads(self.k), heads(self.v), is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim))
