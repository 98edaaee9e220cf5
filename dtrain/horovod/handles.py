"""Async handles (poll, synchronize) and staging tensors for the native collectives."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, Optional, Tuple

import torch

from dtrain.comm.tensors import DTYPES, native_dtype
from dtrain.errors import CommError, ConfigError
from dtrain.horovod import timeline
from dtrain.horovod.basics import HorovodInternalError

_WIDEN = {torch.int8: torch.int32, torch.int16: torch.int32}  # reduced in int32, wrapped back as Horovod's would


# ---------------------------------------------------------------- handles

class _Pending:
    """One async call: native works to wait on, and what turns them into the result."""

    __slots__ = ("works", "finish", "name", "keep", "span")

    def __init__(self, works, finish: Callable[[], object], name: Optional[str], keep=(), span=None):
        self.works, self.finish, self.name, self.keep, self.span = works, finish, name, keep, span


class _Handles:
    """The process's outstanding async calls, by Horovod's integer handle."""

    table: Dict[int, _Pending] = {}
    names: Dict[str, int] = {}
    counter = itertools.count(1)


def forget_handles() -> None:
    _Handles.table.clear()
    _Handles.names.clear()


def _register(p: _Pending) -> int:
    h = next(_Handles.counter)
    _Handles.table[h] = p
    if p.name is not None:
        _Handles.names[p.name] = h
    return h


def _claim_name(name: Optional[str], what: str) -> Optional[str]:
    if name is None:
        return None
    if not isinstance(name, str):
        raise ConfigError(f"{what}: name must be a str, got {type(name).__name__}")
    if name in _Handles.names:
        raise ConfigError(f"{what}: another tensor named {name!r} is still being processed (handle "
                          f"{_Handles.names[name]}); synchronize it first, or use a different name")
    return name


def poll(handle: int) -> bool:
    """True once the async call behind `handle` has finished; synchronize() then does not block."""
    p = _Handles.table.get(handle)
    if p is None:
        raise ConfigError(f"poll: unknown handle {handle!r} (already synchronized, or not from this process)")
    return all(w.is_completed() for w in p.works)


def synchronize(handle):
    """Waits for an async call and returns its result (a tensor, a tuple or a list of tensors).

    Raises:
        HorovodInternalError: the call failed on some rank (the message names it and why).
    """
    p = _Handles.table.pop(handle, None)
    if p is None:
        return None
    if p.name is not None:
        _Handles.names.pop(p.name, None)
    try:
        for w in p.works:
            w.wait(None)
        out = p.finish()
    except CommError as e:
        raise _internal(e, p.name) from e
    if p.span is not None:
        timeline.close_span(p.span)
    return out


def _internal(e: CommError, name: Optional[str]) -> HorovodInternalError:
    return HorovodInternalError(f"{name}: {e}" if name else str(e))


def _run(what: str, name: Optional[str], fn):
    """Runs a synchronous call, turning dtrain's CommError into Horovod's HorovodInternalError."""
    try:
        return fn()
    except HorovodInternalError:
        raise
    except CommError as e:
        raise _internal(e, name or what) from e


# ---------------------------------------------------------------- staging

def _contiguous_cpu(t: torch.Tensor, what: str) -> Tuple[torch.Tensor, Optional[Callable[[], None]]]:
    """A contiguous CPU tensor of a native dtype holding t, and what copies a result back into t."""
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{what} takes a torch.Tensor, got {type(t).__name__}")
    if t.is_sparse:
        raise ConfigError(f"{what} got a sparse tensor: use hvd.sparse_allreduce_async, or t.to_dense()")
    wide = _WIDEN.get(t.dtype)
    if wide is None and t.dtype not in DTYPES:
        native_dtype(t, what)  # raises, naming the dtypes that travel
    if wide is None and t.device.type == "cpu" and t.is_contiguous():
        return t, None
    if t.device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what} got a tensor on {t.device}: move it to the CPU or a CUDA device")
    buf = t.detach().to("cpu", dtype=wide or t.dtype, memory_format=torch.contiguous_format,
                        copy=True).contiguous()
    return buf, (lambda: t.data.copy_(buf))


_CODES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8,
          torch.int8, torch.int16, torch.bool, torch.complex64, torch.complex128]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (any dtype, any device) as a contiguous CPU 2-D tensor (rows of dim 0) of a dtype the native
    backend moves: other dtypes travel as their bytes."""
    src = t.detach()
    src = src.reshape(1) if src.dim() == 0 else src
    src = src.contiguous().cpu()
    rows = src.reshape(src.shape[0], math.prod(src.shape[1:]))
    return rows if rows.dtype in DTYPES else rows.view(torch.uint8)


def _unrows(rows: torch.Tensor, like: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of _rows for `n` rows shaped like `like` (dim 0 aside)."""
    out = rows.view(like.dtype) if rows.dtype != like.dtype else rows
    shape = [n] + list(like.shape[1:]) if like.dim() else [n]
    out = out.reshape(shape)
    return out if like.device.type == "cpu" else out.to(like.device)


__all__ = ["poll", "synchronize", "forget_handles"]
