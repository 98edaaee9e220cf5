"""backend="mpi": dtrain's collectives through mpi4py, on the MPI library mpirun started.

    mpirun -np 4 -x DTRAIN_BACKEND=mpi python train.py      # or dtrain.init(backend="mpi")

The runtime here offers what the native one does to dtrain.comm.api (the same group
methods, taking addresses and element counts), so every collective, group, strategy and
Work handle works unchanged. Memory is handed to MPI in place through
`MPI.buffer.fromaddress`. Reductions of float16/bfloat16 tensors run in float32 (MPI has no
such types) and round back; "avg" is a sum divided afterwards. Wire compression is a
native-backend feature: here tensors travel as they are (`compress_wire` is False, so
AllReduceStrategy sends float32). A rank that aborts ends the MPI job (MPI_Abort).
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence

import numpy as np

from dtrain.comm.foreign import ForeignWork, reduce_scatter_by_allreduce, reducible, sendrecv_by_send_recv
from dtrain.comm.tensors import element_size as _esize
from dtrain.comm.tensors import offsets as _offsets
from dtrain.errors import CommError, ConfigError

def _mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError("backend='mpi' needs mpi4py: pip install 'dtrain[mpi]'") from None
    return MPI


def _bytes(ptr: int, nbytes: int) -> np.ndarray:
    """The `nbytes` bytes at `ptr`, for calls that move data without looking at it."""
    return np.frombuffer(_mpi().buffer.fromaddress(ptr, nbytes), dtype=np.uint8) if nbytes else \
        np.empty(0, dtype=np.uint8)


class MpiWork(ForeignWork):
    """An MPI request (or nothing left to wait for) and what to do once it completes."""

    def _poll(self) -> bool:
        return self._handle.Test()

    def _block(self) -> None:
        self._handle.Wait()


class MpiGroup:
    """A communicator over `ranks` (global ranks), with the native group's interface."""

    compress_wire = False

    def __init__(self, comm, ranks: Sequence[int], name: str):
        self.comm, self.ranks, self.name = comm, list(ranks), name
        self.rank = comm.Get_rank() if comm is not None else -1
        self.size = len(self.ranks)

    def _member(self, what: str):
        if self.comm is None:
            raise ConfigError(f"{what} on group {self.name}, which this rank is not a member of")
        return self.comm

    def _run(self, start: Callable, after: Optional[Callable[[], None]], async_op: bool):
        """start(blocking) runs the call (returning a request when not blocking)."""
        try:
            if async_op:
                return MpiWork(start(False), after)
            start(True)
        except Exception as e:  # mpi4py raises MPI.Exception
            raise CommError(f"MPI call failed on group {self.name}, rank {self.rank}: {e}") from None
        if after is not None:
            after()
        return None

    def allreduce(self, ptr, count, dt, op, wire, async_op):
        comm, MPI = self._member("allreduce"), _mpi()
        mpi_op = {"sum": MPI.SUM, "avg": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX, "prod": MPI.PROD}[op.name]
        work, after = reducible(ptr, count, dt, op.name, self.size)  # MPI has no half types, no avg
        arr = work.numpy()
        return self._run(lambda block: comm.Allreduce(MPI.IN_PLACE, arr, mpi_op) if block
                         else comm.Iallreduce(MPI.IN_PLACE, arr, mpi_op), after, async_op)

    def broadcast(self, ptr, count, dt, root, async_op):
        comm = self._member("broadcast")
        buf = _bytes(ptr, count * _esize(dt))
        return self._run(lambda block: comm.Bcast(buf, root=root) if block else comm.Ibcast(buf, root=root),
                         None, async_op)

    def allgather(self, src, out, counts, dt, async_op):
        comm, MPI = self._member("allgather"), _mpi()
        nb = [c * _esize(dt) for c in counts]
        displ = _offsets(nb)
        send, recv = _bytes(src, nb[self.rank]), _bytes(out, sum(nb))
        spec = [recv, nb, displ, MPI.BYTE]
        return self._run(lambda block: comm.Allgatherv([send, MPI.BYTE], spec) if block
                         else comm.Iallgatherv([send, MPI.BYTE], spec), None, async_op)

    def reduce_scatter(self, src, out, count, dt, op, wire, async_op):
        return reduce_scatter_by_allreduce(self, src, out, count, dt, op, wire, async_op)

    def alltoall(self, src, send_counts, out, recv_counts, dt, async_op):
        comm, MPI = self._member("alltoall"), _mpi()
        sn, rn = [c * _esize(dt) for c in send_counts], [c * _esize(dt) for c in recv_counts]
        sd, rd = _offsets(sn), _offsets(rn)
        send, recv = [_bytes(src, sum(sn)), sn, sd, MPI.BYTE], [_bytes(out, sum(rn)), rn, rd, MPI.BYTE]
        return self._run(lambda block: comm.Alltoallv(send, recv) if block else comm.Ialltoallv(send, recv),
                         None, async_op)

    def send(self, ptr, count, dt, dst, async_op):
        comm = self._member("send")
        buf = _bytes(ptr, count * _esize(dt))
        return self._run(lambda block: comm.Send(buf, dest=dst) if block else comm.Isend(buf, dest=dst),
                         None, async_op)

    def recv(self, ptr, count, dt, src, async_op):
        comm = self._member("recv")
        buf = _bytes(ptr, count * _esize(dt))
        return self._run(lambda block: comm.Recv(buf, source=src) if block else comm.Irecv(buf, source=src),
                         None, async_op)

    def sendrecv(self, sbuf, sn, dst, rbuf, rn, src, dt, async_op):
        return sendrecv_by_send_recv(self, sbuf, sn, dst, rbuf, rn, src, dt, async_op)

    def barrier(self, async_op):
        comm = self._member("barrier")
        return self._run(lambda block: comm.Barrier() if block else comm.Ibarrier(), None, async_op)


class MpiWorld:
    """What the runtime's `world` answers for the MPI backend."""

    def __init__(self):
        MPI = _mpi()
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()

    def broken(self) -> Optional[str]:
        return None  # MPI reports failures by aborting the job

    def abort(self, why: str) -> None:
        sys.stderr.write(f"dtrain: rank {self.rank} aborts the MPI job: {why}\n")
        sys.stderr.flush()
        self.comm.Abort(1)

    def transport_to(self, peer: int) -> str:
        return "mpi"


class MpiRuntime:
    """dtrain.init(backend="mpi"): the world and groups over MPI.COMM_WORLD."""

    def __init__(self, timeout: float):
        from dtrain.comm.group import Group
        self.world = MpiWorld()
        self.timeout, self.backend = timeout, "mpi"
        self.default = Group(MpiGroup(self.world.comm, range(self.world.size), "world"))
        self._groups_made = 0

    def new_group(self, ranks: Sequence[int]):
        from dtrain.comm.group import Group
        ranks = [int(r) for r in ranks]
        self._groups_made += 1
        name = f"group{self._groups_made}[{','.join(map(str, ranks))}]"
        # Every rank calls new_group alike (as with the native backend); Create_group is
        # collective over the members only, and the others get a group they cannot call.
        comm = None
        if self.world.rank in ranks:
            sub = self.world.comm.Get_group().Incl(ranks)
            comm = self.world.comm.Create_group(sub, tag=self._groups_made)
            sub.Free()
        return Group(MpiGroup(comm, ranks, name))


def under_mpirun(env) -> bool:
    return any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"))


__all__: List[str] = ["MpiRuntime"]
