"""allgather, broadcast and alltoall: collectives that move tensors without reducing them."""

from __future__ import annotations

from typing import List

import torch

from dtrain import _C
from dtrain.comm.group import resolve
from dtrain.comm.tensors import DTYPES
from dtrain.errors import ConfigError
from dtrain.horovod import timeline
from dtrain.horovod.basics import Average, HorovodInternalError, check_root, global_process_set, group_of, set_rank
from dtrain.horovod.handles import (_CODES, _Pending, _claim_name, _contiguous_cpu, _register, _rows, _run,
                                    _unrows)


def _allreduce(*args, **kwargs):
    from dtrain.horovod.ops import allreduce  # the backward passes reduce; ops imports this module
    return allreduce(*args, **kwargs)


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
        reduced = _allreduce(grad.detach(), op=Average, process_set=ctx.process_set)
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
        reduced = _allreduce(grad.detach(), op=Average, process_set=ctx.process_set)
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


__all__ = ["allgather", "allgather_async", "grouped_allgather", "grouped_allgather_async", "broadcast", "broadcast_",
           "broadcast_async", "broadcast_async_", "alltoall", "alltoall_async"]
