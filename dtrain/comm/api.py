"""The process-group API: dtrain.init, dtrain.allreduce, ...

Every collective takes ``group=None`` (the world) or a Group from new_group(),
works on CPU tensors of float32/float64/float16/bfloat16/int32/int64/uint8 of
any size (0 included) and layout, and never holds the GIL while bytes move.
"""

from __future__ import annotations

import math
import os
import sys
from typing import List, Optional, Sequence

import torch

from dtrain import _C, memory
from dtrain.comm import rendezvous
from dtrain.comm.group import Group, Runtime, Work, _Current, current, env_bytes, resolve
from dtrain.comm.tensors import DTYPES, native_dtype, redop, staging, wire_dtype
from dtrain.errors import CommError, ConfigError

_BACKENDS = ("native", "mpi", "torch")


def init(backend: Optional[str] = None, timeout: float = 300.0) -> None:
    """Joins the job described by the launcher's environment (see dtrain.comm.rendezvous).

    Args:
        backend: "native" (default), "mpi" (collectives through mpi4py, under mpirun) or
            "torch" (through torch.distributed's gloo, as a reference); also DTRAIN_BACKEND.
        timeout: seconds any collective may go without progress before CommTimeout.

    Raises:
        ConfigError: unknown backend or inconsistent environment.
        RendezvousError / CommTimeout: the other ranks could not be reached in time.

    Example (2 ranks, ``dtrain-run -n 2 script.py``)::

        dtrain.init()
        dtrain.rank()        # rank 0: 0     rank 1: 1
    """
    if _Current.runtime is not None:
        return
    memory.keep_freed_memory()  # no page faults through freed activations every step (DTRAIN_MALLOC=0: off)
    backend = backend or os.environ.get("DTRAIN_BACKEND", "native")
    if backend not in _BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: this build provides {', '.join(_BACKENDS)}")
    if not (timeout > 0):
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if backend == "mpi":
        from dtrain.comm import mpi_backend
        if not mpi_backend.under_mpirun(os.environ):
            raise ConfigError("backend='mpi' runs under mpirun (or mpiexec): start the script with "
                              "`mpirun -np N python train.py` or `dtrain-run --mpi -n N train.py`")
        _Current.runtime = mpi_backend.MpiRuntime(float(timeout))
        _abort_on_uncaught_exception()
        return
    env = rendezvous.from_environ()
    if backend == "torch":
        from dtrain.comm import torch_backend
        _Current.runtime = torch_backend.TorchRuntime(env, float(timeout))
        _abort_on_uncaught_exception()
        return
    world = _C.World(
        env.rank, env.world_size, env.master_addr, env.master_port, env.token, float(timeout),
        store_fd=env.store_fd, transport=os.environ.get("DTRAIN_TRANSPORT", "auto"),
        host_id=env.host_id, shm_bytes=env_bytes("DTRAIN_SHM_BYTES", 4 << 20),
        tcp_bytes=env_bytes("DTRAIN_TCP_BYTES", 4 << 20))
    runtime = Runtime(world, float(timeout), backend)
    # Nobody leaves init until everyone holds every connection, so a rank that
    # finishes early can never take the rendezvous store down under a slower one.
    runtime.default._native.barrier(False)
    _Current.runtime = runtime
    _abort_on_uncaught_exception()


def _abort_on_uncaught_exception() -> None:
    """A rank that dies of an uncaught exception tells the others at once (they raise CommError
    naming it) instead of leaving them to wait: its process may live on a while (mpi4py's
    MPI_Finalize at exit waits for every rank), so peers would see no dead process."""
    prev = sys.excepthook
    if getattr(prev, "_dtrain", False):
        return

    def hook(exc_type, exc, tb):
        try:
            abort_world(f"an uncaught {exc_type.__name__}: {exc}")
        finally:
            prev(exc_type, exc, tb)

    hook._dtrain = True
    sys.excepthook = hook


def abort_world(why: str) -> None:
    """Marks the world broken so every other rank's collectives raise CommError at once, naming
    this rank and `why` (a rank that is about to fail). Does nothing when not initialised,
    alone, or already broken."""
    rt = _Current.runtime
    if rt is not None and rt.world.size > 1 and rt.world.broken() is None:
        rt.world.abort(f"rank {rt.world.rank} stopped with {why}")


def is_initialized() -> bool:
    return _Current.runtime is not None


_before_shutdown: list = []


def register_before_shutdown(fn) -> None:
    """`fn()` runs at the start of shutdown(), before the closing barrier (a parameter-server
    worker tells its servers it is done there; they reach the barrier only after that)."""
    _before_shutdown.append(fn)


def shutdown() -> None:
    """Leaves the job: waits for the other ranks (unless communication broke), then closes."""
    rt = _Current.runtime
    if rt is None:
        return
    hooks = list(_before_shutdown)
    _before_shutdown.clear()
    for fn in hooks:
        fn()
    _Current.runtime = None
    if rt.world.size > 1 and rt.world.broken() is None:
        try:
            rt.default._native.barrier(False)
        except CommError:
            pass  # a peer is gone; there is nobody left to wait for
    if hasattr(rt, "close"):
        rt.close()


def rank() -> int:
    """This process's rank in the world (0 .. world_size()-1)."""
    return current().world.rank


def world_size() -> int:
    return current().world.size


def local_rank() -> int:
    """This process's index among the ranks on its host."""
    return current().world.local_rank


def local_size() -> int:
    """How many ranks share this host."""
    return current().world.local_size


def new_group(ranks: Sequence[int]) -> Group:
    """A sub-communicator over `ranks` (global ranks). Every rank of the world must call it,
    in the same order, with the same list, as with torch.distributed.new_group.

    Example (4 ranks)::

        pairs = [dtrain.new_group([0, 1]), dtrain.new_group([2, 3])]
        mine = pairs[dtrain.rank() // 2]
        dtrain.allreduce(t, group=mine)   # ranks 0,1 sum together; 2,3 together
    """
    return current().new_group(ranks)


def _finish(t: torch.Tensor, buf: torch.Tensor, copy_back: bool, native_work, async_op: bool):
    if async_op:
        return Work(native_work, result=t, finalize=(lambda: t.copy_(buf)) if copy_back else None,
                    keep=(t, buf))
    if copy_back:
        t.copy_(buf)
    return t


def allreduce(t: torch.Tensor, op: str = "sum", compression: Optional[str] = None,
              group: Optional[Group] = None, async_op: bool = False):
    """Reduces `t` across ranks, in place.

    Args:
        t: the tensor; every rank passes the same shape and dtype.
        op: "sum", "avg", "min", "max" or "prod" ("avg" needs a floating-point tensor).
        compression: None, "fp16" or "bf16": half precision on the wire, float32
            accumulation at every hop (float32 tensors only); all ranks get identical results.
        group: a Group from new_group(), or None for the world.
        async_op: return a Work at once; its wait() returns `t`.

    Returns:
        `t` (or a Work).

    Raises:
        ConfigError: bad op, dtype, compression or group.
        CommError: a peer died or called something else (the message quotes both sides).
        CommTimeout: no progress within the timeout (the message names the missing ranks).

    Example (2 ranks)::

        t = torch.tensor([1.0, 2.0]) * (dtrain.rank() + 1)
        dtrain.allreduce(t)   # rank 0: tensor([3., 6.])   rank 1: tensor([3., 6.])
    """
    g = resolve(group)
    buf, copy_back = staging(t, "allreduce")
    dt = native_dtype(buf, "allreduce")
    work = g.allreduce(buf.data_ptr(), buf.numel(), dt, redop(op), wire_dtype(compression, dt), async_op)
    return _finish(t, buf, copy_back, work, async_op)


def broadcast(t: torch.Tensor, root: int = 0, group: Optional[Group] = None, async_op: bool = False):
    """Copies `t` from rank `root` (a rank of `group`) to every rank, in place.

    Example (2 ranks)::

        t = torch.full((2,), float(dtrain.rank()))
        dtrain.broadcast(t, root=1)   # rank 0: tensor([1., 1.])   rank 1: tensor([1., 1.])
    """
    g = resolve(group)
    buf, copy_back = staging(t, "broadcast")
    work = g.broadcast(buf.data_ptr(), buf.numel(), native_dtype(buf, "broadcast"), int(root), async_op)
    return _finish(t, buf, copy_back, work, async_op)


def _shape_record(t: torch.Tensor) -> torch.Tensor:
    """[ndim, dtype code, dims..] padded to 10 int64s, to compare shapes across ranks."""
    if t.dim() > 8:
        raise ConfigError(f"tensors of more than 8 dimensions are not supported here (got {t.dim()})")
    rec = torch.full((10,), -1, dtype=torch.int64)
    rec[0], rec[1] = t.dim(), list(DTYPES).index(t.dtype)
    if t.dim():
        rec[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return rec


def _describe(rec: List[int]) -> str:
    ndim, code = rec[0], rec[1]
    dtype = str(list(DTYPES)[code]).replace("torch.", "")
    return f"{dtype}{tuple(rec[2:2 + ndim])}"


def _gather_shapes(t: torch.Tensor, g, what: str) -> List[List[int]]:
    recs = torch.empty((g.size, 10), dtype=torch.int64)
    mine = _shape_record(t)
    g.allgather(mine.data_ptr(), recs.data_ptr(), [10] * g.size, _C.DType.int64, False)
    return recs.tolist()


def allgather(t: torch.Tensor, group: Optional[Group] = None) -> torch.Tensor:
    """Concatenates every rank's `t` along dim 0, in rank order. Dim 0 may differ per rank;
    the other dims and the dtype must match (a 0-d tensor counts as shape (1,)).

    Example (2 ranks)::

        t = torch.arange(dtrain.rank() + 1)       # rank 0: [0]   rank 1: [0, 1]
        dtrain.allgather(t)                       # both: tensor([0, 0, 1])
    """
    g = resolve(group)
    src, _ = staging(t if t.dim() else t.reshape(1), "allgather")
    native_dtype(src, "allgather")
    recs = _gather_shapes(src, g, "allgather")
    mine = recs[g.rank]
    for r, rec in enumerate(recs):
        if rec[0] != mine[0] or rec[1] != mine[1] or rec[3:2 + rec[0]] != mine[3:2 + mine[0]]:
            raise CommError(f"mismatched allgather: rank {g.ranks[g.rank]} passed {_describe(mine)} but rank "
                            f"{g.ranks[r]} passed {_describe(rec)}; all dims but the first, and the dtype, "
                            "must match on every rank")
    rows = [rec[2] for rec in recs]
    inner = list(src.shape[1:])
    per_row = math.prod(inner)
    out = torch.empty([sum(rows)] + inner, dtype=src.dtype)
    g.allgather(src.data_ptr(), out.data_ptr(), [r * per_row for r in rows], native_dtype(src, "allgather"), False)
    return out if t.device.type == "cpu" else out.to(t.device)


def allgather_bytes(payload: bytes, group: Optional[Group] = None) -> List[bytes]:
    """Every rank's `payload` (any length, 0 included), in rank order: for pickles, JSON and
    other records that ranks gather without tensors of their own."""
    mine = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    sizes = allgather(torch.tensor([mine.numel()], dtype=torch.int64), group=group).tolist()
    flat = allgather(mine, group=group)
    out, off = [], 0
    for n in sizes:
        out.append(flat[off: off + n].numpy().tobytes())
        off += n
    return out


def broadcast_bytes(payload: bytes, root: int = 0, group: Optional[Group] = None) -> bytes:
    """Rank `root`'s `payload` (any length, 0 included) on every rank of `group`; what the other
    ranks pass is ignored. For pickles and other records broadcast without tensors of their own."""
    mine = resolve(group).rank == root
    n = torch.tensor([len(payload) if mine else 0], dtype=torch.int64)
    broadcast(n, root=root, group=group)
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if mine and payload
           else torch.empty(int(n.item()), dtype=torch.uint8))
    broadcast(buf, root=root, group=group)
    return payload if mine else buf.numpy().tobytes()


def reduce_scatter(t: torch.Tensor, op: str = "sum", group: Optional[Group] = None,
                   compression: Optional[str] = None) -> torch.Tensor:
    """Reduces `t` across ranks and returns block `rank` of dim 0 (dim 0 must divide by the size).

    Example (2 ranks)::

        t = torch.arange(4.0) + dtrain.rank()     # rank 0: [0,1,2,3]   rank 1: [1,2,3,4]
        dtrain.reduce_scatter(t)                  # rank 0: [1., 3.]    rank 1: [5., 7.]
    """
    g = resolve(group)
    src, _ = staging(t, "reduce_scatter")
    if src.dim() == 0 or src.shape[0] % g.size:
        raise ConfigError(f"reduce_scatter needs dim 0 divisible by the group size {g.size}, got shape "
                          f"{tuple(src.shape)}: pad dim 0 to a multiple of {g.size}")
    dt = native_dtype(src, "reduce_scatter")
    out = torch.empty([src.shape[0] // g.size] + list(src.shape[1:]), dtype=src.dtype)
    g.reduce_scatter(src.data_ptr(), out.data_ptr(), out.numel(), dt, redop(op), wire_dtype(compression, dt), False)
    return out if t.device.type == "cpu" else out.to(t.device)


def alltoall(t: torch.Tensor, splits: Optional[Sequence[int]] = None,
             group: Optional[Group] = None) -> torch.Tensor:
    """Sends rows splits[i] of `t` (dim 0) to rank i; returns the rows received, in rank order.

    With splits=None dim 0 is split evenly. Ranks learn each other's splits first,
    so the blocks received may differ in size.

    Example (2 ranks)::

        t = torch.tensor([10, 11, 12]) + 100 * dtrain.rank()
        # rank 0 sends [10] to itself, [11, 12] to rank 1; rank 1 sends [110, 111] to 0, [112] to itself
        out = dtrain.alltoall(t, splits=[1, 2] if dtrain.rank() == 0 else [2, 1])
        # rank 0: tensor([10, 110, 111])   rank 1: tensor([11, 12, 112])
    """
    g = resolve(group)
    src, _ = staging(t if t.dim() else t.reshape(1), "alltoall")
    dt = native_dtype(src, "alltoall")
    if splits is None:
        if src.shape[0] % g.size:
            raise ConfigError(f"alltoall without splits needs dim 0 ({src.shape[0]}) divisible by the group "
                              f"size {g.size}: pass splits=[...] with one row count per rank")
        splits = [src.shape[0] // g.size] * g.size
    splits = [int(s) for s in splits]
    if len(splits) != g.size or sum(splits) != src.shape[0] or min(splits) < 0:
        raise ConfigError(f"alltoall splits {splits} must hold {g.size} non-negative row counts summing to "
                          f"dim 0 ({src.shape[0]})")
    per_row = math.prod(src.shape[1:])
    send = torch.tensor(splits, dtype=torch.int64)
    recv = torch.empty(g.size, dtype=torch.int64)
    g.alltoall(send.data_ptr(), [1] * g.size, recv.data_ptr(), [1] * g.size, _C.DType.int64, False)
    rows = recv.tolist()
    out = torch.empty([sum(rows)] + list(src.shape[1:]), dtype=src.dtype)
    g.alltoall(src.data_ptr(), [s * per_row for s in splits], out.data_ptr(), [r * per_row for r in rows], dt, False)
    return out if t.device.type == "cpu" else out.to(t.device)


def send(t: torch.Tensor, dst: int, group: Optional[Group] = None) -> None:
    """Sends `t` to rank `dst` (a rank of `group`), which must call recv with the same size and dtype."""
    g = resolve(group)
    buf, _ = staging(t, "send")
    g.send(buf.data_ptr(), buf.numel(), native_dtype(buf, "send"), int(dst), False)


def recv(t: torch.Tensor, src: int, group: Optional[Group] = None) -> torch.Tensor:
    """Receives into `t` from rank `src`; returns `t`."""
    g = resolve(group)
    buf, copy_back = staging(t, "recv")
    g.recv(buf.data_ptr(), buf.numel(), native_dtype(buf, "recv"), int(src), False)
    if copy_back:
        t.copy_(buf)
    return t


def sendrecv(send_t: Optional[torch.Tensor], dst: Optional[int], recv_t: Optional[torch.Tensor],
             src: Optional[int], group: Optional[Group] = None) -> Optional[torch.Tensor]:
    """Sends `send_t` to `dst` while receiving into `recv_t` from `src`, as one call that returns
    once both are done (either side may be None). Two neighbours that swap tensors this way
    never wait on each other's send, as each would with send() then recv(). Both tensors must
    have the same dtype. Returns `recv_t`.

    Example (2 ranks)::

        out = torch.empty(3)
        peer = 1 - dtrain.rank()
        dtrain.sendrecv(torch.full((3,), float(dtrain.rank())), peer, out, peer)   # out: the peer's rank
    """
    g = resolve(group)
    if (send_t is None) != (dst is None) or (recv_t is None) != (src is None):
        raise ConfigError("sendrecv takes a tensor and a rank for each side it uses: "
                          f"send_t={'given' if send_t is not None else None} with dst={dst}, "
                          f"recv_t={'given' if recv_t is not None else None} with src={src}")
    if send_t is not None and recv_t is not None and send_t.dtype != recv_t.dtype:
        raise ConfigError(f"sendrecv sends {send_t.dtype} but receives {recv_t.dtype}: use one dtype for both")
    sbuf = staging(send_t, "sendrecv")[0] if send_t is not None else None
    rbuf, copy_back = staging(recv_t, "sendrecv") if recv_t is not None else (None, False)
    dt = native_dtype(sbuf if sbuf is not None else rbuf, "sendrecv") if (sbuf is not None or rbuf is not None) \
        else _C.DType.uint8
    g.sendrecv(sbuf.data_ptr() if sbuf is not None else 0, sbuf.numel() if sbuf is not None else 0,
               -1 if dst is None else int(dst), rbuf.data_ptr() if rbuf is not None else 0,
               rbuf.numel() if rbuf is not None else 0, -1 if src is None else int(src), dt, False)
    if copy_back:
        recv_t.copy_(rbuf)
    return recv_t


def barrier(group: Optional[Group] = None) -> None:
    """Returns once every rank of `group` has called barrier."""
    resolve(group).barrier(False)
