"""Fused optimizers: drop-in torch.optim.Adam/AdamW/SGD whose step is one C++ call."""

from dtrain.optim.fused import FusedAdam, FusedAdamW, FusedSGD

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD"]
