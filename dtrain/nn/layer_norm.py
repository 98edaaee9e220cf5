"""FusedLayerNorm: torch.nn.LayerNorm's parameters and state_dict, dtrain's fused kernel."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from dtrain.ops.nn import fused_layer_norm


class FusedLayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm (same arguments, parameters and state_dict keys) whose forward
    and backward are one fused pass each on CPU float32/float64 and CUDA
    float32/float16/bfloat16 tensors (elsewhere torch's own LayerNorm runs).

    A normalized_shape of several dimensions is normalised as one flattened last dimension.

    Example::

        ln = FusedLayerNorm(1024)
        ln.load_state_dict(torch.nn.LayerNorm(1024).state_dict())   # interchangeable
    """

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.normalized_shape)
        if k == 1:
            return fused_layer_norm(x, self.weight, self.bias, self.eps)
        lead = x.shape[:-k]
        flat = x.reshape(*lead, -1)
        w = self.weight.reshape(-1) if self.weight is not None else None
        b = self.bias.reshape(-1) if self.bias is not None else None
        return fused_layer_norm(flat, w, b, self.eps).reshape(x.shape)
