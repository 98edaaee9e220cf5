"""Drop-in modules built on dtrain's fused kernels."""

from dtrain.nn.layer_norm import FusedLayerNorm

__all__ = ["FusedLayerNorm"]
