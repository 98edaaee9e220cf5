"""Horovod's gradient compression classes.

``Compression.fp16`` keeps Horovod's interface (compress/decompress cast to and from
float16), but inside dtrain.horovod's own reductions it is not a cast before an fp16
sum: float32 tensors travel as fp16 and are added in float32 at every hop, so the
result carries one fp16 rounding per rank's contribution instead of one per addition.
Your own Compressor subclasses run as in Horovod: compress, reduce, decompress.
"""

from __future__ import annotations

from typing import Optional

import torch


class Compressor:
    """Interface: compress(tensor) -> (tensor, ctx); decompress(tensor, ctx) -> tensor."""

    @staticmethod
    def compress(tensor):
        raise NotImplementedError

    @staticmethod
    def decompress(tensor, ctx):
        raise NotImplementedError


class NoneCompressor(Compressor):
    """Sends tensors as they are."""

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class FP16Compressor(Compressor):
    """Floating-point tensors as float16 (see the module docstring for what reductions do)."""

    @staticmethod
    def compress(tensor):
        if tensor.dtype.is_floating_point:
            return tensor.type(torch.float16), tensor.dtype
        return tensor, tensor.dtype

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.type(ctx) if ctx is not None and ctx != tensor.dtype else tensor


class Compression:
    """``compression=`` choices: Compression.none, Compression.fp16."""

    none = NoneCompressor
    fp16 = FP16Compressor


def wire_of(compression) -> Optional[str]:
    """'none' or 'fp16' for the built-in compressors (dtrain handles them natively); None for a
    user's own Compressor, which runs compress -> reduce -> decompress."""
    if compression is None or compression is NoneCompressor:
        return "none"
    if compression is FP16Compressor:
        return "fp16"
    if not (hasattr(compression, "compress") and hasattr(compression, "decompress")):
        from dtrain.errors import ConfigError
        raise ConfigError(f"compression must be hvd.Compression.none, hvd.Compression.fp16 or a Compressor with "
                          f"compress/decompress, got {compression!r}")
    return None


__all__ = ["Compressor", "NoneCompressor", "FP16Compressor", "Compression", "wire_of"]
