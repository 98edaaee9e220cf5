"""Turning torch tensors into (address, count, dtype) for the native backend."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from dtrain import _C
from dtrain.errors import ConfigError

DTYPES = {
    torch.float32: _C.DType.float32,
    torch.float64: _C.DType.float64,
    torch.float16: _C.DType.float16,
    torch.bfloat16: _C.DType.bfloat16,
    torch.int32: _C.DType.int32,
    torch.int64: _C.DType.int64,
    torch.uint8: _C.DType.uint8,
}

TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


def element_size(dt: "_C.DType") -> int:
    return _C.dtype_size(dt)


def offsets(sizes) -> list:
    """Start of each block of `sizes`, laid end to end."""
    out, at = [], 0
    for n in sizes:
        out.append(at)
        at += int(n)
    return out


REDOPS = {name: getattr(_C.RedOp, name) for name in ("sum", "avg", "min", "max", "prod")}

WIRES = {"fp16": _C.DType.float16, "bf16": _C.DType.bfloat16}


def native_dtype(t: torch.Tensor, what: str) -> "_C.DType":
    try:
        return DTYPES[t.dtype]
    except KeyError:
        names = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
        raise ConfigError(f"{what} got a {str(t.dtype).replace('torch.', '')} tensor, which the native "
                          f"backend does not carry: use one of {names} (for example t.to(torch.float32))"
                          ) from None


def redop(op: str) -> "_C.RedOp":
    try:
        return REDOPS[op]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown reduction op {op!r}: use one of {', '.join(REDOPS)}") from None


def wire_dtype(compression: Optional[str], dt: "_C.DType") -> "_C.DType":
    if compression is None or compression == "none":
        return dt
    try:
        return WIRES[compression]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown compression {compression!r}: use None, 'fp16' or 'bf16'") from None


def staging(t: torch.Tensor, what: str) -> Tuple[torch.Tensor, bool]:
    """A contiguous CPU tensor holding t's data, and whether results must be copied back into t.

    CUDA tensors are staged through pinned host memory (the torch backend moves them
    with NCCL instead); other devices are refused.
    """
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{what} takes a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "cpu":
        if t.is_contiguous():
            return t, False
        return t.contiguous(), True
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t)
        return host, True
    raise ConfigError(f"{what} got a tensor on device '{t.device}', which the native backend cannot reach: "
                      "move it to the CPU (t.cpu()), or use backend='torch' for accelerator tensors")


def broadcast_coalesced(tensors: List[torch.Tensor], send: Callable[[torch.Tensor], None]) -> None:
    """Overwrites every tensor, in place, with the root's: `send(t)` broadcasts one tensor in
    place. Tensors of one native dtype and device travel as one flat buffer (one call instead
    of one per tensor); any other dtype (bool, int8, complex, ...) goes to `send` one by one."""
    by_kind: Dict[tuple, List[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_kind.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, _), ts in by_kind.items():
        if len(ts) == 1 or dtype not in DTYPES:
            for t in ts:
                send(t)
            continue
        flat = torch.cat([t.detach().reshape(-1).cpu() for t in ts])
        send(flat)
        off = 0
        with torch.no_grad():
            for t in ts:
                t.copy_(flat[off: off + t.numel()].view_as(t))
                off += t.numel()
