"""What the backends that hand dtrain's calls to another library (mpi, torch) share: views of
the memory dtrain.comm.api passes by address, reductions for libraries without half types or
"avg", and reduce_scatter built from allreduce."""

from __future__ import annotations

import ctypes
import time
from typing import Callable, Optional, Tuple

import torch

from dtrain import _C
from dtrain.comm.tensors import TORCH_DTYPES, element_size
from dtrain.errors import ConfigError

HALF = (_C.DType.float16, _C.DType.bfloat16)


def view(ptr: int, count: int, dt) -> torch.Tensor:
    """The `count` elements at `ptr` as a CPU tensor sharing that memory."""
    if count == 0:
        return torch.empty(0, dtype=TORCH_DTYPES[dt])
    raw = (ctypes.c_char * (count * element_size(dt))).from_address(ptr)
    return torch.frombuffer(raw, dtype=TORCH_DTYPES[dt])


def reducible(ptr: int, count: int, dt, op_name: str, size: int) -> Tuple[torch.Tensor, Callable[[], None]]:
    """(the tensor to hand the library, what to run once it has reduced it): half types reduce in
    float32 and round back; "avg" is a sum divided by `size` afterwards."""
    if op_name == "avg" and dt not in (_C.DType.float32, _C.DType.float64) + HALF:
        raise ConfigError("op='avg' needs a floating-point tensor, got an integer one: use op='sum' and divide")
    t = view(ptr, count, dt)
    work = t.float() if dt in HALF else t

    def after():
        if op_name == "avg":
            work.div_(size)
        if work is not t:
            t.copy_(work)

    return work, after


class ForeignWork:
    """Another library's request (or None: nothing left to wait for) and what to run once it
    completes. Subclasses say how to poll it (`_poll`: True once finished) and block on it
    (`_block`: returns when finished, raising the call's error)."""

    def __init__(self, handle=None, after: Optional[Callable[[], None]] = None):
        self._handle, self._after, self._done = handle, after, False

    def _poll(self) -> bool:
        raise NotImplementedError

    def _block(self) -> None:
        raise NotImplementedError

    def _complete(self) -> None:
        if not self._done:
            self._done = True
            if self._after is not None:
                self._after()

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._handle is not None and not self._done:
            if timeout is not None and timeout >= 0:
                deadline = time.monotonic() + timeout
                while not self._poll():
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.0005)
            self._block()
        self._complete()
        return True

    def is_completed(self) -> bool:
        return self._handle is None or self._done or (self._poll() and self.wait(0))


class Then:
    """A Work followed by one more step once it completes."""

    def __init__(self, work, then: Callable[[], None], keep):
        self._work, self._then, self._keep, self._done = work, then, keep, False

    def wait(self, timeout=None) -> bool:
        if not self._work.wait(timeout):
            return False
        if not self._done:
            self._done = True
            self._then()
        return True

    def is_completed(self) -> bool:
        return self._done or (self._work.is_completed() and self.wait(0))


def reduce_scatter_by_allreduce(group, src: int, out: int, count: int, dt, op, wire, async_op: bool) -> Optional[Then]:
    """For libraries without reduce_scatter: allreduce everything (on a copy), keep this rank's block."""
    full = view(src, count * group.size, dt).clone()
    mine = view(out, count, dt)
    work = group.allreduce(full.data_ptr(), full.numel(), dt, op, wire, async_op)

    def keep():
        mine.copy_(full[group.rank * count:(group.rank + 1) * count])

    if work is None:
        keep()
        return None
    return Then(work, keep, full)


def sendrecv_by_send_recv(group, sbuf: int, sn: int, dst: int, rbuf: int, rn: int, src: int, dt,
                          async_op: bool) -> None:
    """For libraries with non-blocking point-to-point calls: post both legs, then wait for both,
    so neither side's send waits on the other's."""
    if async_op:
        raise ConfigError("sendrecv is blocking only")
    works = []
    if dst >= 0:
        works.append(group.send(sbuf, sn, dt, dst, True))
    if src >= 0:
        works.append(group.recv(rbuf, rn, dt, src, True))
    for w in works:
        w.wait(None)
    return None
