"""Horovod's collectives on torch tensors, over dtrain's native ones: the reductions here,
allgather/broadcast/alltoall in dtrain.horovod.transfer, handles in dtrain.horovod.handles.

Each call runs the native collective directly: a synchronous allreduce of 4 KiB is one
native call (a few microseconds on one host), not a trip through a background cycle as
in Horovod. Ranks match calls in the order they make them (as torch.distributed does);
``name=`` labels the call in errors and the timeline, and two outstanding async calls
may not share one (as in Horovod).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from dtrain import _C
from dtrain.comm.group import resolve
from dtrain.comm.tensors import DTYPES, native_dtype
from dtrain.errors import ConfigError
from dtrain.horovod import timeline
from dtrain.horovod.basics import (Adasum, Average, NotSupported, ReduceOp, Sum, global_process_set, group_of,
                                   resolve_op, set_size)
from dtrain.horovod.compression import Compression, wire_of
from dtrain.horovod.handles import (_WIDEN, _Pending, _claim_name, _contiguous_cpu, _register, _run,  # noqa: F401
                                    poll, synchronize)
from dtrain.horovod.transfer import (_allgather_sync, _start_allgather, allgather, allgather_async,  # noqa: F401
                                     alltoall, alltoall_async, broadcast, broadcast_, broadcast_async,
                                     broadcast_async_, grouped_allgather, grouped_allgather_async)

_NATIVE_OP = {ReduceOp.Sum: _C.RedOp.sum, ReduceOp.Min: _C.RedOp.min, ReduceOp.Max: _C.RedOp.max,
              ReduceOp.Product: _C.RedOp.prod}


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


def _checks(op, average, process_set):
    """Horovod's op (from op= or the deprecated average=), after checking the process set."""
    group_of(process_set)  # raises for an unregistered set
    return resolve_op(op, average)


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=global_process_set) -> int:
    """Starts an out-of-place allreduce; `synchronize(handle)` returns the result (`tensor` is
    left as it is)."""
    op = _checks(op, average, process_set)
    name = _claim_name(name, "allreduce_async")
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    return _allreduce_into(out, op, prescale_factor, postscale_factor, None, group_of(process_set), name, True,
                           "allreduce_async", keep=(tensor,))


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=global_process_set) -> int:
    """Starts an in-place allreduce of `tensor`; `synchronize(handle)` returns `tensor`."""
    op = _checks(op, average, process_set)
    name = _claim_name(name, "allreduce_async_")
    return _allreduce_into(tensor.data if tensor.requires_grad else tensor, op, prescale_factor, postscale_factor,
                           None, group_of(process_set), name, True, "allreduce_async_", result=tensor)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=global_process_set):
    """Averages (or sums, ...) `tensor` across the set's ranks, in place; returns `tensor`."""
    op = _checks(op, average, process_set)
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
    op = _checks(op, average, process_set)
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
    op = _checks(op, average, process_set)
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
    op = _checks(op, average, process_set)
    name = _claim_name(name, "grouped_allreduce_async")
    return _grouped_start(tensors, op, prescale_factor, postscale_factor, None, process_set, name,
                          "grouped_allreduce_async", _fresh(tensors), True)


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=global_process_set):
    op = _checks(op, average, process_set)
    return _grouped_start(tensors, op, prescale_factor, postscale_factor, None, process_set, name,
                          "grouped_allreduce_", None, False)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                             process_set=global_process_set) -> int:
    op = _checks(op, average, process_set)
    name = _claim_name(name, "grouped_allreduce_async_")
    return _grouped_start(tensors, op, prescale_factor, postscale_factor, None, process_set, name,
                          "grouped_allreduce_async_", None, True)


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
