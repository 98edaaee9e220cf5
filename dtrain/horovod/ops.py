"""Horovod's collectives on torch tensors, over dtrain's native ones.

Each call runs the native collective directly: a synchronous allreduce of 4 KiB is one
native call (a few microseconds on one host), not a trip through a background cycle as
in Horovod. Ranks match calls in the order they make them (as torch.distributed does);
``name=`` labels the call in errors and the timeline, and two outstanding async calls
may not share one (as in Horovod).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dtrain import _C
from dtrain.comm.group import resolve
from dtrain.comm.tensors import DTYPES, native_dtype
from dtrain.errors import CommError, ConfigError
from dtrain.horovod import timeline
from dtrain.horovod.basics import (Adasum, Average, HorovodInternalError, NotSupported, ReduceOp, Sum,
                                   check_root, global_process_set, group_of, resolve_op, set_rank, set_size)
from dtrain.horovod.compression import Compression, wire_of

_NATIVE_OP = {ReduceOp.Sum: _C.RedOp.sum, ReduceOp.Min: _C.RedOp.min, ReduceOp.Max: _C.RedOp.max,
              ReduceOp.Product: _C.RedOp.prod}
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


# ---------------------------------------------------------------- allreduce

def _reduce_plan(op: ReduceOp, dtype: torch.dtype, n: int):
    """(native op, what runs on the result) for Horovod's op on this dtype."""
    if op == Adasum:
        raise NotSupported("op=hvd.Adasum is not provided by dtrain.horovod (its pairwise projection has no "
                           "native kernel here): use op=hvd.Average")
    if op == Average:
        if dtype.is_floating_point:
            return _C.RedOp.avg, None
        # Integers average as Horovod's do: the sum scaled by 1/n, truncated toward zero.
        return _C.RedOp.sum, (lambda b: b.copy_(torch.div(b, n, rounding_mode="trunc")))
    return _NATIVE_OP[op], None


def _tagged(g, shape) -> dict:
    """The shape check native groups compare across ranks (other backends take none)."""
    return {"tag": _C.shape_tag(list(shape))} if type(g) is _C.Group else {}


def _start_allreduce(buf: torch.Tensor, op: ReduceOp, prescale: float, postscale: float, wire_name, group,
                     async_op: bool, shape=None):
    """Reduces `buf` (contiguous CPU, native dtype) in place; returns (native work or None, after).
    `shape` (default buf's) is checked against every rank's."""
    g = resolve(group)
    native_op, fix = _reduce_plan(op, buf.dtype, g.size)
    if prescale != 1.0:
        buf.mul_(prescale)
    dt = DTYPES[buf.dtype]
    wire = dt
    if wire_name is not None and buf.dtype == torch.float32:
        wire = _C.DType.float16 if wire_name == "fp16" else _C.DType.bfloat16

    def after():
        if fix is not None:
            fix(buf)
        if postscale != 1.0:
            buf.mul_(postscale)

    work = g.allreduce(buf.data_ptr(), buf.numel(), dt, native_op, wire, async_op,
                       **_tagged(g, buf.shape if shape is None else shape))
    return work, after


def _allreduce_into(out: torch.Tensor, op, prescale, postscale, wire_name, group, name, async_op, what,
                    result=None, keep=()):
    """Reduces `out` in place (staging it when needed). Sync: returns `result` (default `out`);
    async: a handle."""
    buf, back = _contiguous_cpu(out, what)
    result = out if result is None else result
    span = timeline.open_span(what, name, out)
    if not async_op:
        def run():
            _, after = _start_allreduce(buf, op, prescale, postscale, wire_name, group, False, out.shape)
            after()
            if back is not None:
                back()
            return result
        done = _run(what, name, run)
        timeline.close_span(span)
        return done
    work, after = _run(what, name, lambda: _start_allreduce(buf, op, prescale, postscale, wire_name, group, True,
                                                            out.shape))

    def finish():
        after()
        if back is not None:
            back()
        return result

    return _register(_Pending([work], finish, name, keep=(buf, out) + tuple(keep), span=span))


def _checks(tensor, op, average, process_set, what):
    op = resolve_op(op, average)
    group_of(process_set)  # raises for an unregistered set
    return op


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=global_process_set) -> int:
    """Starts an out-of-place allreduce; `synchronize(handle)` returns the result (`tensor` is
    left as it is)."""
    op = _checks(tensor, op, average, process_set, "allreduce_async")
    name = _claim_name(name, "allreduce_async")
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    return _allreduce_into(out, op, prescale_factor, postscale_factor, None, group_of(process_set), name, True,
                           "allreduce_async", keep=(tensor,))


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=global_process_set) -> int:
    """Starts an in-place allreduce of `tensor`; `synchronize(handle)` returns `tensor`."""
    op = _checks(tensor, op, average, process_set, "allreduce_async_")
    name = _claim_name(name, "allreduce_async_")
    return _allreduce_into(tensor.data if tensor.requires_grad else tensor, op, prescale_factor, postscale_factor,
                           None, group_of(process_set), name, True, "allreduce_async_", result=tensor)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=global_process_set):
    """Averages (or sums, ...) `tensor` across the set's ranks, in place; returns `tensor`."""
    op = _checks(tensor, op, average, process_set, "allreduce_")
    return _allreduce_into(tensor.data if tensor.requires_grad else tensor, op, prescale_factor, postscale_factor,
                           None, group_of(process_set), name, False, "allreduce_", result=tensor)


class _AllreduceFn(torch.autograd.Function):
    """forward: allreduce; backward: allreduce of the gradient with the same op and scales."""

    @staticmethod
    def forward(ctx, tensor, op, prescale, postscale, wire, process_set, name):
        ctx.args = (op, prescale, postscale, process_set)
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
        return _allreduce_into(out, op, prescale, postscale, wire, group_of(process_set), name, False, "allreduce")

    @staticmethod
    def backward(ctx, grad):
        op, prescale, postscale, process_set = ctx.args
        g = grad.detach().clone(memory_format=torch.contiguous_format)
        _allreduce_into(g, op, prescale, postscale, None, group_of(process_set), None, False, "allreduce backward")
        return g, None, None, None, None, None, None


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0,
              postscale_factor=1.0, process_set=global_process_set):
    """Averages (default), sums, or takes the min/max/product of `tensor` across the set's ranks.
    `tensor` is left as it is; the result is a new tensor. Differentiable.

    Args:
        compression: Compression.none, or Compression.fp16 (float32 tensors travel as fp16 and
            accumulate in float32 at every hop, so the sum is more exact than Horovod's, which
            adds in fp16), or your own Compressor (compress, reduce, decompress).
        prescale_factor / postscale_factor: multiply before / after the reduction.

    Example (2 ranks)::

        t = torch.tensor([1.0, 2.0]) * (hvd.rank() + 1)
        hvd.allreduce(t)               # both: tensor([1.5000, 3.0000])
        hvd.allreduce(t, op=hvd.Sum)   # both: tensor([3., 6.])
    """
    op = _checks(tensor, op, average, process_set, "allreduce")
    wire = wire_of(compression)
    if wire is None and compression is not Compression.none:
        compressed, ctx = compression.compress(tensor)
        reduced = allreduce(compressed, name=name, op=op, prescale_factor=prescale_factor,
                            postscale_factor=postscale_factor, process_set=process_set)
        return compression.decompress(reduced, ctx)
    if wire == "none":
        wire = None
    if tensor.requires_grad and torch.is_grad_enabled():
        return _AllreduceFn.apply(tensor, op, prescale_factor, postscale_factor, wire, process_set, name)
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    return _allreduce_into(out, op, prescale_factor, postscale_factor, wire, group_of(process_set), name, False,
                           "allreduce")


# ---------------------------------------------------------------- grouped allreduce

def _grouped_start(tensors: Sequence[torch.Tensor], op, prescale, postscale, wire, process_set, name, what,
                   outputs: Optional[List[torch.Tensor]], async_op: bool):
    """One fused native allreduce per dtype over `tensors`; results land in `outputs` (or in the
    tensors themselves). Returns the outputs, or a handle."""
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ConfigError(f"{what} takes a list of tensors, got {type(tensors).__name__}")
    group = group_of(process_set)
    results = list(outputs) if outputs is not None else list(tensors)
    by_dtype: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(_WIDEN.get(t.dtype, t.dtype), []).append(i)
    works, afters, keep = [], [], []
    span = timeline.open_span(what, name, tensors[0] if tensors else None)
    for dtype, idx in by_dtype.items():
        if dtype not in DTYPES:
            native_dtype(tensors[idx[0]], what)
        flat = torch.cat([tensors[i].detach().reshape(-1).to("cpu", dtype) for i in idx]) if idx else \
            torch.empty(0, dtype=dtype)
        sig = [x for i in idx for x in (tensors[i].dim(), *tensors[i].shape)]  # every shape, checked across ranks
        work, after = _run(what, name, lambda: _start_allreduce(flat, op, prescale, postscale, wire, group,
                                                                async_op, sig))
        works.append(work)
        keep.append(flat)

        def unpack(flat=flat, idx=idx, after=after):
            after()
            off = 0
            for i in idx:
                n = tensors[i].numel()
                results[i].data.copy_(flat[off: off + n].view(tensors[i].shape))
                off += n
        afters.append(unpack)

    def finish():
        for f in afters:
            f()
        return results

    if not async_op:
        out = finish()
        timeline.close_span(span)
        return out
    return _register(_Pending(works, finish, name, keep=tuple(keep) + tuple(tensors), span=span))


def _fresh(tensors):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


class _GroupedAllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, prescale, postscale, wire, process_set, name, *tensors):
        ctx.args = (op, prescale, postscale, process_set)
        return tuple(_grouped_start(tensors, op, prescale, postscale, wire, process_set, name, "grouped_allreduce",
                                    _fresh(tensors), False))

    @staticmethod
    def backward(ctx, *grads):
        op, prescale, postscale, process_set = ctx.args
        grads = [g.contiguous() for g in grads]
        out = _grouped_start(grads, op, prescale, postscale, None, process_set, None, "grouped_allreduce backward",
                             _fresh(grads), False)
        return (None,) * 6 + tuple(out)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set):
    """allreduce of every tensor in the list as one fused call per dtype; returns new tensors."""
    op = _checks(None, op, average, process_set, "grouped_allreduce")
    wire = wire_of(compression)
    if wire is None and compression is not Compression.none:
        pairs = [compression.compress(t) for t in tensors]
        reduced = grouped_allreduce([c for c, _ in pairs], name=name, op=op, prescale_factor=prescale_factor,
                                    postscale_factor=postscale_factor, process_set=process_set)
        return [compression.decompress(r, ctx) for r, (_, ctx) in zip(reduced, pairs)]
    wire = None if wire == "none" else wire
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return list(_GroupedAllreduceFn.apply(op, prescale_factor, postscale_factor, wire, process_set, name,
                                              *tensors))
    return _grouped_start(tensors, op, prescale_factor, postscale_factor, wire, process_set, name,
                          "grouped_allreduce", _fresh(tensors), False)


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                            process_set=global_process_set) -> int:
    op = _checks(None, op, average, process_set, "grouped_allreduce_async")
    name = _claim_name(name, "grouped_allreduce_async")
    return _grouped_start(tensors, op, prescale_factor, postscale_factor, None, process_set, name,
                          "grouped_allreduce_async", _fresh(tensors), True)


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=global_process_set):
    op = _checks(None, op, average, process_set, "grouped_allreduce_")
    return _grouped_start(tensors, op, prescale_factor, postscale_factor, None, process_set, name,
                          "grouped_allreduce_", None, False)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                             process_set=global_process_set) -> int:
    op = _checks(None, op, average, process_set, "grouped_allreduce_async_")
    name = _claim_name(name, "grouped_allreduce_async_")
    return _grouped_start(tensors, op, prescale_factor, postscale_factor, None, process_set, name,
                          "grouped_allreduce_async_", None, True)


# ---------------------------------------------------------------- allgather

def _start_allgather(tensor: torch.Tensor, process_set, what: str, async_op: bool):
    """Gathers along dim 0 (which may differ per rank); returns (work or None, finish, keep)."""
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"{what} takes a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() > 8:
        raise ConfigError(f"{what}: tensors of more than 8 dimensions are not supported (got {tensor.dim()})")
    g = resolve(group_of(process_set))
    rows = _rows(tensor)
    dims = list(tensor.shape[1:]) if tensor.dim() else []
    code = _CODES.index(tensor.dtype) if tensor.dtype in _CODES else 99
    rec = torch.tensor([rows.shape[0], len(dims)] + dims + [-1] * (7 - len(dims)) + [code], dtype=torch.int64)
    recs = torch.empty((g.size, rec.numel()), dtype=torch.int64)
    g.allgather(rec.data_ptr(), recs.data_ptr(), [rec.numel()] * g.size, _C.DType.int64, False)
    mine = rec.tolist()
    for r, other in enumerate(recs.tolist()):
        if other[1:] != mine[1:]:
            raise HorovodInternalError(
                f"{what}: mismatched shapes or dtypes: rank {g.ranks[g.rank]} passed {_show(mine)} but rank "
                f"{g.ranks[r]} passed {_show(other)}; every dim but the first, and the dtype, must match")
    counts = recs[:, 0].tolist()
    per_row = rows.shape[1]
    out_rows = torch.empty((sum(counts), per_row), dtype=rows.dtype)
    work = g.allgather(rows.data_ptr(), out_rows.data_ptr(), [c * per_row for c in counts],
                       DTYPES[rows.dtype], async_op)
    return work, (lambda: _unrows(out_rows, tensor, sum(counts))), (rows, out_rows, rec, recs)


def _show(rec: List[int]) -> str:
    code, ndim = rec[-1], rec[1]
    dtype = str(_CODES[code]).replace("torch.", "") if code < len(_CODES) else "an unusual dtype"
    return f"{dtype} of shape ({', '.join(['*'] + [str(d) for d in rec[2:2 + ndim]])})"


def allgather_async(tensor, name=None, process_set=global_process_set) -> int:
    name = _claim_name(name, "allgather_async")
    work, finish, keep = _run("allgather_async", name,
                              lambda: _start_allgather(tensor, process_set, "allgather_async", True))
    return _register(_Pending([work], finish, name, keep=keep + (tensor,),
                              span=timeline.open_span("allgather_async", name, tensor)))


class _AllgatherFn(torch.autograd.Function):
    """forward: gather along dim 0; backward: average the gradient, keep this rank's rows."""

    @staticmethod
    def forward(ctx, tensor, process_set, name):
        ctx.rows, ctx.process_set = tensor.shape[0] if tensor.dim() else 1, process_set
        return _allgather_sync(tensor, process_set, name)

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad.detach(), op=Average, process_set=ctx.process_set)
        rows = _allgather_sync(torch.tensor([ctx.rows], dtype=torch.int64), ctx.process_set, None).tolist()
        start = sum(rows[: set_rank(ctx.process_set)])
        return reduced.narrow(0, start, ctx.rows), None, None


def _allgather_sync(tensor, process_set, name):
    def run():
        work, finish, _ = _start_allgather(tensor, process_set, "allgather", False)
        return finish()
    return _run("allgather", name, run)


def allgather(tensor, name=None, process_set=global_process_set):
    """Concatenates every rank's `tensor` along dim 0, in rank order (dim 0 may differ per rank;
    other dims and the dtype must match). Differentiable.

    Example (2 ranks)::

        t = torch.full((hvd.rank() + 1, 2), float(hvd.rank()))
        hvd.allgather(t)   # both: tensor([[0., 0.], [1., 1.], [1., 1.]])
    """
    if tensor.requires_grad and torch.is_grad_enabled():
        return _AllgatherFn.apply(tensor, process_set, name)
    return _allgather_sync(tensor, process_set, name)


def grouped_allgather(tensors, name=None, process_set=global_process_set) -> List[torch.Tensor]:
    return [allgather(t, name=f"{name}.{i}" if name else None, process_set=process_set)
            for i, t in enumerate(tensors)]


def grouped_allgather_async(tensors, name=None, process_set=global_process_set) -> int:
    name = _claim_name(name, "grouped_allgather_async")
    parts = [_run("grouped_allgather_async", name,
                  lambda t=t: _start_allgather(t, process_set, "grouped_allgather_async", True)) for t in tensors]
    return _register(_Pending([w for w, _, _ in parts], lambda: [f() for _, f, _ in parts], name,
                              keep=tuple(k for _, _, k in parts) + tuple(tensors)))


# ---------------------------------------------------------------- broadcast

def _broadcast_into(out: torch.Tensor, root: int, process_set, name, async_op: bool, what: str, result=None):
    group = group_of(process_set)
    if out.dtype in DTYPES:
        buf, back = _contiguous_cpu(out, what)
        view = buf.reshape(-1)
    else:  # any other dtype travels as its bytes
        buf = out.detach().contiguous().cpu() if not (out.is_contiguous() and out.device.type == "cpu") else out
        back = (lambda: out.data.copy_(buf)) if buf is not out else None
        view = buf.reshape(-1).view(torch.uint8) if buf.numel() else torch.empty(0, dtype=torch.uint8)
    g = resolve(group)
    result = out if result is None else result
    span = timeline.open_span(what, name, out)

    def finish():
        if back is not None:
            back()
        return result

    _agree_on_root(g, root, out, what, name)
    work = _run(what, name, lambda: g.broadcast(view.data_ptr(), view.numel(), DTYPES[view.dtype], root, async_op))
    if not async_op:
        timeline.close_span(span)
        return finish()
    return _register(_Pending([work], finish, name, keep=(buf, view, out), span=span))


def _agree_on_root(g, root: int, t: torch.Tensor, what: str, name) -> None:
    """Every rank checks that all passed the same root, shape and dtype (one small allreduce):
    in a broadcast only non-roots receive, so two ranks that each think they are the root would
    otherwise both finish. Raises HorovodInternalError on every rank alike; the job goes on."""
    if g.size == 1:
        return
    tag = _C.shape_tag(list(t.shape)) ^ (_CODES.index(t.dtype) if t.dtype in _CODES else 99)
    tag = tag - (1 << 64) if tag >= 1 << 63 else tag  # as an int64
    mine = torch.tensor([root, -root, tag, -tag], dtype=torch.int64)
    agg = mine.clone()
    _run(what, name, lambda: g.allreduce(agg.data_ptr(), 4, _C.DType.int64, _C.RedOp.max, _C.DType.int64, False))
    label = f"{what} {name!r}" if name else what
    if agg[0] != -agg[1]:
        raise HorovodInternalError(f"{label}: mismatched broadcast root ranks: ranks passed roots from {-int(agg[1])} "
                                   f"to {int(agg[0])} (this rank: {root}); every rank must pass the same root_rank")
    if agg[2] != -agg[3]:
        raise HorovodInternalError(f"{label}: mismatched broadcast tensors: this rank passed "
                                   f"{str(t.dtype)[6:]} of shape {tuple(t.shape)}, another rank a different shape "
                                   "or dtype; every rank must pass the same shape and dtype")


class _BroadcastFn(torch.autograd.Function):
    """forward: root's value everywhere; backward: the averaged gradient on the root, zero elsewhere."""

    @staticmethod
    def forward(ctx, tensor, root, process_set, name):
        ctx.root, ctx.process_set = root, process_set
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
        return _broadcast_into(out, root, process_set, name, False, "broadcast")

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad.detach(), op=Average, process_set=ctx.process_set)
        if set_rank(ctx.process_set) != ctx.root:
            reduced.zero_()
        return reduced, None, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """Returns rank `root_rank`'s `tensor` on every rank (`tensor` is left as it is). Differentiable.

    Example (2 ranks)::

        t = torch.full((2,), float(hvd.rank()))
        hvd.broadcast(t, root_rank=1)   # both: tensor([1., 1.])
    """
    root = check_root(root_rank, process_set, "broadcast")
    if tensor.requires_grad and torch.is_grad_enabled():
        return _BroadcastFn.apply(tensor, root, process_set, name)
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    return _broadcast_into(out, root, process_set, name, False, "broadcast")


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    """Overwrites `tensor` with rank `root_rank`'s, in place; returns `tensor`."""
    root = check_root(root_rank, process_set, "broadcast_")
    return _broadcast_into(tensor.data if tensor.requires_grad else tensor, root, process_set, name, False,
                           "broadcast_", result=tensor)


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    root = check_root(root_rank, process_set, "broadcast_async")
    name = _claim_name(name, "broadcast_async")
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    return _broadcast_into(out, root, process_set, name, True, "broadcast_async")


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    root = check_root(root_rank, process_set, "broadcast_async_")
    name = _claim_name(name, "broadcast_async_")
    return _broadcast_into(tensor.data if tensor.requires_grad else tensor, root, process_set, name, True,
                           "broadcast_async_", result=tensor)


# ---------------------------------------------------------------- alltoall

def _splits_list(splits, rows: int, n: int, what: str) -> List[int]:
    if splits is None:
        if rows % n:
            raise ConfigError(f"{what}: without splits, dim 0 ({rows}) must divide by the number of ranks ({n}); "
                              "pass splits=[rows for rank 0, rows for rank 1, ...]")
        return [rows // n] * n
    out = [int(s) for s in (splits.tolist() if isinstance(splits, torch.Tensor) else splits)]
    if len(out) != n or min(out, default=0) < 0 or sum(out) != rows:
        raise ConfigError(f"{what}: splits {out} must hold {n} non-negative row counts (one per rank) summing to "
                          f"dim 0 of the tensor ({rows})")
    return out


def _start_alltoall(tensor, splits, process_set, what, async_op):
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"{what} takes a torch.Tensor, got {type(tensor).__name__}")
    g = resolve(group_of(process_set))
    rows = _rows(tensor)
    send = _splits_list(splits, rows.shape[0], g.size, what)
    per_row = rows.shape[1]
    counts = torch.tensor(send, dtype=torch.int64)
    recv = torch.empty(g.size, dtype=torch.int64)
    g.alltoall(counts.data_ptr(), [1] * g.size, recv.data_ptr(), [1] * g.size, _C.DType.int64, False)
    got = recv.tolist()
    out_rows = torch.empty((sum(got), per_row), dtype=rows.dtype)
    work = g.alltoall(rows.data_ptr(), [s * per_row for s in send], out_rows.data_ptr(), [r * per_row for r in got],
                      DTYPES[rows.dtype], async_op)

    def finish():
        return _unrows(out_rows, tensor, sum(got)), torch.tensor(got, dtype=torch.int32)

    return work, finish, (rows, out_rows)


class _AlltoallFn(torch.autograd.Function):
    """forward: rows splits[i] to rank i; backward: the gradient's rows sent back where they came from."""

    @staticmethod
    def forward(ctx, tensor, splits, process_set, name):
        out, received = _run("alltoall", name, lambda: _start_alltoall(tensor, splits, process_set, "alltoall",
                                                                      False)[1]())
        ctx.received, ctx.process_set = received, process_set
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, _unused):
        back, _ = _run("alltoall backward", None,
                       lambda: _start_alltoall(grad, ctx.received, ctx.process_set, "alltoall backward", False)[1]())
        return back, None, None, None


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """Sends rows splits[i] of `tensor` (dim 0) to rank i and returns what every rank sent here,
    in rank order. Without `splits` dim 0 is cut evenly and only the tensor is returned; with
    them, (tensor, received_splits). Differentiable.

    Example (2 ranks)::

        t = torch.tensor([10, 11, 12]) + 100 * hvd.rank()
        out, got = hvd.alltoall(t, splits=[1, 2] if hvd.rank() == 0 else [2, 1])
        # rank 0: tensor([10, 110, 111]), tensor([1, 2])   rank 1: tensor([11, 12, 112]), tensor([2, 1])
    """
    if tensor.requires_grad and torch.is_grad_enabled():
        out, received = _AlltoallFn.apply(tensor, splits, process_set, name)
    else:
        out, received = _run("alltoall", name,
                             lambda: _start_alltoall(tensor, splits, process_set, "alltoall", False)[1]())
    return out if splits is None else (out, received)


def alltoall_async(tensor, splits=None, name=None, process_set=global_process_set) -> int:
    """Starts an alltoall; `synchronize(handle)` returns (tensor, received_splits)."""
    name = _claim_name(name, "alltoall_async")
    work, finish, keep = _run("alltoall_async", name,
                              lambda: _start_alltoall(tensor, splits, process_set, "alltoall_async", True))
    return _register(_Pending([work], finish, name, keep=keep + (tensor,),
                              span=timeline.open_span("alltoall_async", name, tensor)))


# ---------------------------------------------------------------- reducescatter

def _rows_of(rows: int, n: int) -> List[int]:
    """Horovod's split of dim 0: as even as possible, the first ranks take one row more."""
    return [rows // n + (1 if r < rows % n else 0) for r in range(n)]


def _start_reducescatter(tensor, op, prescale, postscale, wire, process_set, what, async_op):
    group = group_of(process_set)
    g = resolve(group)
    n = g.size
    src, _ = _contiguous_cpu(tensor.detach(), what)
    if src.dim() == 0:
        raise ConfigError(f"{what} needs a tensor with at least one dimension (it splits dim 0), got a scalar")
    rows = _rows_of(src.shape[0], n)
    block = max(rows)
    inner = list(src.shape[1:])
    if all(r == block for r in rows):
        padded = src.clone() if prescale != 1.0 else src
    else:  # rank r's rows start block r of an evenly cut tensor, so one native call serves uneven splits
        padded = src.new_zeros([block * n] + inner)
        start = 0
        for r, k in enumerate(rows):
            padded[r * block: r * block + k] = src[start: start + k]
            start += k
    native_op, fix = _reduce_plan(op, src.dtype, n)
    if prescale != 1.0:
        padded.mul_(prescale)
    out = torch.empty([block] + inner, dtype=src.dtype)
    dt = DTYPES[src.dtype]
    wire_dt = dt if wire is None or src.dtype != torch.float32 else \
        (_C.DType.float16 if wire == "fp16" else _C.DType.bfloat16)
    work = g.reduce_scatter(padded.data_ptr(), out.data_ptr(), out.numel(), dt, native_op, wire_dt, async_op)
    mine = rows[g.rank]

    def finish():
        res = out[:mine]
        if fix is not None:
            fix(res)
        if postscale != 1.0:
            res.mul_(postscale)
        if _WIDEN.get(tensor.dtype):
            res = res.to(tensor.dtype)
        return res if tensor.device.type == "cpu" else res.to(tensor.device)

    return work, finish, (padded, out)


class _ReducescatterFn(torch.autograd.Function):
    """forward: reduce, keep this rank's rows; backward: gather the rows' gradients (averaged for Average)."""

    @staticmethod
    def forward(ctx, tensor, op, prescale, postscale, wire, process_set, name):
        ctx.args = (op, prescale, postscale, process_set)
        return _run("reducescatter", name, lambda: _start_reducescatter(
            tensor, op, prescale, postscale, wire, process_set, "reducescatter", False)[1]())

    @staticmethod
    def backward(ctx, grad):
        op, prescale, postscale, process_set = ctx.args
        full = _allgather_sync(grad.detach().contiguous(), process_set, None)
        scale = prescale * postscale / (set_size(process_set) if op == Average else 1)
        return (full * scale if scale != 1.0 else full), None, None, None, None, None, None


def reducescatter(tensor, name=None, compression=Compression.none, op=Average, process_set=global_process_set,
                  prescale_factor=1.0, postscale_factor=1.0):
    """Reduces `tensor` across ranks and returns this rank's rows of dim 0: rows are cut as evenly
    as possible, the first ranks taking one more. Differentiable.

    Example (2 ranks)::

        t = torch.arange(3.0) + hvd.rank()     # rank 0: [0, 1, 2]   rank 1: [1, 2, 3]
        hvd.reducescatter(t, op=hvd.Sum)       # rank 0: tensor([1., 3.])   rank 1: tensor([5.])
    """
    op = resolve_op(op, None)
    wire = wire_of(compression)
    if wire is None and compression is not Compression.none:
        compressed, ctx = compression.compress(tensor)
        return compression.decompress(reducescatter(compressed, name=name, op=op, process_set=process_set,
                                                    prescale_factor=prescale_factor,
                                                    postscale_factor=postscale_factor), ctx)
    wire = None if wire == "none" else wire
    if tensor.requires_grad and torch.is_grad_enabled():
        return _ReducescatterFn.apply(tensor, op, prescale_factor, postscale_factor, wire, process_set, name)
    return _run("reducescatter", name, lambda: _start_reducescatter(
        tensor, op, prescale_factor, postscale_factor, wire, process_set, "reducescatter", False)[1]())


def reducescatter_async(tensor, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0,
                        postscale_factor=1.0) -> int:
    op = resolve_op(op, None)
    name = _claim_name(name, "reducescatter_async")
    work, finish, keep = _run("reducescatter_async", name, lambda: _start_reducescatter(
        tensor, op, prescale_factor, postscale_factor, None, process_set, "reducescatter_async", True))
    return _register(_Pending([work], finish, name, keep=keep + (tensor,)))


def grouped_reducescatter(tensors, name=None, compression=Compression.none, op=Average,
                          process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0):
    return [reducescatter(t, name=f"{name}.{i}" if name else None, compression=compression, op=op,
                          process_set=process_set, prescale_factor=prescale_factor, postscale_factor=postscale_factor)
            for i, t in enumerate(tensors)]


def grouped_reducescatter_async(tensors, name=None, op=Average, process_set=global_process_set,
                                prescale_factor=1.0, postscale_factor=1.0) -> int:
    op = resolve_op(op, None)
    name = _claim_name(name, "grouped_reducescatter_async")
    parts = [_run("grouped_reducescatter_async", name, lambda t=t: _start_reducescatter(
        t, op, prescale_factor, postscale_factor, None, process_set, "grouped_reducescatter_async", True))
        for t in tensors]
    return _register(_Pending([w for w, _, _ in parts], lambda: [f() for _, f, _ in parts], name,
                              keep=tuple(k for _, _, k in parts) + tuple(tensors)))


# ---------------------------------------------------------------- sparse

def sparse_allreduce_async(tensor, name=None, op=Average, process_set=global_process_set) -> int:
    """Starts the reduction of a sparse COO tensor: indices and values of every rank are gathered
    (duplicates summed when the result is coalesced). `synchronize(handle)` returns it."""
    if not (isinstance(tensor, torch.Tensor) and tensor.is_sparse):
        raise ConfigError("sparse_allreduce_async takes a sparse COO tensor (tensor.is_sparse); use "
                          "allreduce_async for dense ones")
    op = resolve_op(op, None)
    if op not in (Average, Sum):
        raise NotSupported(f"sparse_allreduce_async reduces with hvd.Average or hvd.Sum, got {op!r}")
    name = _claim_name(name, "sparse_allreduce_async")
    t = tensor.coalesce()
    iw, ifin, ikeep = _run("sparse_allreduce_async", name, lambda: _start_allgather(
        t.indices().t().contiguous(), process_set, "sparse_allreduce_async indices", True))
    vw, vfin, vkeep = _run("sparse_allreduce_async", name, lambda: _start_allgather(
        t.values().contiguous(), process_set, "sparse_allreduce_async values", True))

    def finish():
        idx, vals = ifin(), vfin()
        if op == Average:
            vals = vals / set_size(process_set)
        return torch.sparse_coo_tensor(idx.t(), vals, tensor.shape)

    return _register(_Pending([iw, vw], finish, name, keep=ikeep + vkeep + (t,)))


# ---------------------------------------------------------------- barrier, join

def barrier(process_set=global_process_set) -> None:
    """Returns once every rank of the set has called barrier."""
    g = resolve(group_of(process_set))
    _run("barrier", None, lambda: g.barrier(False))


def join(device=-1) -> int:
    """This rank has no more data. Until every rank has joined, it takes part in the other ranks'
    DistributedOptimizer steps with zero gradients (so their reductions complete); returns the
    rank that joined last. Other collectives made by ranks still training are not answered
    by a joined rank: after join, only optimizer steps may go on."""
    from dtrain.horovod import optimizer
    return _run("join", None, optimizer.join_steps)


__all__ = [
    "poll", "synchronize", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
    "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_", "allgather", "allgather_async",
    "grouped_allgather", "grouped_allgather_async", "broadcast", "broadcast_", "broadcast_async",
    "broadcast_async_", "alltoall", "alltoall_async", "reducescatter", "reducescatter_async",
    "grouped_reducescatter", "grouped_reducescatter_async", "sparse_allreduce_async", "barrier", "join",
]
