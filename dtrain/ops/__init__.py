"""Fused operations: tensor fusion (pack/unpack with casts), multi-tensor norms, and
bias+GELU and LayerNorm with their backward."""

from dtrain.ops.fusion import clip_grad_norm_, multi_tensor_norm, pack, unpack
from dtrain.ops.nn import fused_bias_gelu, fused_layer_norm

__all__ = ["pack", "unpack", "multi_tensor_norm", "clip_grad_norm_", "fused_bias_gelu", "fused_layer_norm"]
