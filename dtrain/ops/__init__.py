"""Fused operations: tensor fusion (pack/unpack with casts), multi-tensor norms."""

from dtrain.ops.fusion import clip_grad_norm_, multi_tensor_norm, pack, unpack

__all__ = ["pack", "unpack", "multi_tensor_norm", "clip_grad_norm_"]
