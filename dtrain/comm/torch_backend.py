"""backend="torch": dtrain's collectives through torch.distributed (gloo), as a reference.

    dtrain-run -n 4 train.py        # with dtrain.init(backend="torch"), or DTRAIN_BACKEND=torch

The same environment contract and launchers as the native backend: rank 0 serves a
torch TCPStore on DTRAIN_MASTER_PORT (on the socket dtrain-run already bound, when it hands
one over) and every rank joins a gloo process group through it. The runtime offers what the
native one does to dtrain.comm.api (group methods taking addresses and element counts), so
every collective, group, strategy and Work handle runs unchanged; memory is handed to gloo in
place. Gloo has no "avg" and no half types in every op: "avg" is a sum divided afterwards,
float16/bfloat16 reduce in float32 and round back. Wire compression is a native-backend
feature (`compress_wire` is False). Gloo's store has no job token: use it on trusted networks.

NCCL (CUDA tensors in place) is not wired in: dtrain.comm.api stages tensors through host
memory, which would defeat it. DTRAIN_TORCH_BACKEND=nccl is refused with that reason.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from dtrain.comm.foreign import ForeignWork, reduce_scatter_by_allreduce, reducible, sendrecv_by_send_recv
from dtrain.comm.foreign import view as _view
from dtrain.comm.tensors import offsets
from dtrain.errors import CommError, ConfigError

_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
        "max": dist.ReduceOp.MAX, "prod": dist.ReduceOp.PRODUCT}


class TorchWork(ForeignWork):
    """A torch.distributed Work (or nothing left to wait for) and what to do once it completes."""

    def __init__(self, group: "TorchGroup", what: str, work=None, after: Optional[Callable[[], None]] = None):
        super().__init__(work, after)
        self._group, self._what = group, what

    def _poll(self) -> bool:
        return self._handle.is_completed()

    def _block(self) -> None:
        try:
            self._handle.wait()  # raises the call's error, if it failed
        except RuntimeError as e:
            raise self._group._error(self._what, e) from None


class TorchGroup:
    """A process group over `ranks` (global ranks), with the native group's interface."""

    compress_wire = False

    def __init__(self, runtime: "TorchRuntime", pg, ranks: Sequence[int], name: str):
        self._rt, self.pg, self.ranks, self.name = runtime, pg, list(ranks), name
        me = runtime.world.rank
        self.rank = self.ranks.index(me) if me in self.ranks else -1
        self.size = len(self.ranks)

    def _member(self, what: str) -> None:
        if self.rank < 0:
            raise ConfigError(f"{what} on group {self.name} (ranks {self.ranks}) from rank {self._rt.world.rank}, "
                              "which is not in it: call it only on the group's ranks, or pass group=None")

    def _error(self, what: str, e: Exception) -> CommError:
        why = self._rt.world.first_failure()
        return CommError(f"{what} on group {self.name} failed on rank {self._rt.world.rank} (torch.distributed "
                         f"{self._rt.world.kind}): {e}" + (f"; the job had already failed at {why}" if why else ""))

    def _run(self, what: str, start: Callable[[bool], object], after: Optional[Callable[[], None]],
             async_op: bool):
        """start(async) issues the call (returning its Work when async)."""
        self._member(what)
        try:
            work = start(async_op)
            if async_op:
                return TorchWork(self, what, work, after)
        except RuntimeError as e:
            raise self._error(what, e) from None
        if after is not None:
            after()
        return None

    def allreduce(self, ptr, count, dt, op, wire, async_op):
        work, after = reducible(ptr, count, dt, op.name, self.size)  # gloo: no avg, half types in float32
        return self._run("allreduce", lambda a: dist.all_reduce(work, _OPS[op.name], group=self.pg, async_op=a),
                         after, async_op)

    def broadcast(self, ptr, count, dt, root, async_op):
        if not 0 <= root < self.size:
            raise ConfigError(f"broadcast root {root} is not a rank of group {self.name} (size {self.size})")
        t = _view(ptr, count, dt)
        src = self.ranks[root]
        return self._run("broadcast", lambda a: dist.broadcast(t, src, group=self.pg, async_op=a), None, async_op)

    def allgather(self, src, out, counts, dt, async_op):
        # Gloo gathers equal blocks: pad each to the longest, then lay the real parts end to end.
        mine, width = _view(src, counts[max(self.rank, 0)], dt), max(counts) if counts else 0
        padded = torch.zeros(width, dtype=mine.dtype)
        padded[:mine.numel()] = mine
        blocks = [torch.empty(width, dtype=mine.dtype) for _ in counts]
        result = _view(out, sum(counts), dt)

        def after():
            for block, at, n in zip(blocks, offsets(counts), counts):
                result[at:at + n] = block[:n]

        return self._run("allgather", lambda a: dist.all_gather(blocks, padded, group=self.pg, async_op=a),
                         after, async_op)

    def reduce_scatter(self, src, out, count, dt, op, wire, async_op):
        return reduce_scatter_by_allreduce(self, src, out, count, dt, op, wire, async_op)  # gloo has none

    def alltoall(self, src, send_counts, out, recv_counts, dt, async_op):
        send, recv = _view(src, sum(send_counts), dt), _view(out, sum(recv_counts), dt)
        return self._run("alltoall", lambda a: dist.all_to_all_single(
            recv, send, list(recv_counts), list(send_counts), group=self.pg, async_op=a), None, async_op)

    def send(self, ptr, count, dt, dst, async_op):
        t, peer = _view(ptr, count, dt), self._peer(dst, "send to")
        return self._run("send", lambda a: (dist.isend if a else dist.send)(t, peer, group=self.pg), None, async_op)

    def recv(self, ptr, count, dt, src, async_op):
        t, peer = _view(ptr, count, dt), self._peer(src, "recv from")
        return self._run("recv", lambda a: (dist.irecv if a else dist.recv)(t, peer, group=self.pg), None, async_op)

    def _peer(self, r: int, what: str) -> int:
        if not 0 <= r < self.size or r == self.rank:
            raise ConfigError(f"{what} rank {r}: it must be another rank of group {self.name} (size {self.size})")
        return self.ranks[r]

    def sendrecv(self, sbuf, sn, dst, rbuf, rn, src, dt, async_op):
        return sendrecv_by_send_recv(self, sbuf, sn, dst, rbuf, rn, src, dt, async_op)

    def barrier(self, async_op):
        return self._run("barrier", lambda a: dist.barrier(group=self.pg, async_op=a), None, async_op)


class TorchWorld:
    """What the runtime's `world` answers for the torch backend."""

    def __init__(self, store, rank: int, size: int, kind: str):
        self.store, self.rank, self.size, self.kind = store, rank, size, kind
        self.local_rank = int(os.environ.get("DTRAIN_LOCAL_RANK", os.environ.get("LOCAL_RANK", rank)))
        self.local_size = int(os.environ.get("DTRAIN_LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", size)))
        self._broken: Optional[str] = None

    def broken(self) -> Optional[str]:
        return self._broken

    def first_failure(self) -> Optional[str]:
        """What the first rank to abort posted to the store, if any (a short look)."""
        try:
            if self.store.check(["dtrain/abort"]):
                return self.store.get("dtrain/abort").decode(errors="replace")
        except Exception:  # the store lives in rank 0, which may be the one that died
            return None
        return None

    def abort(self, why: str) -> None:
        """Posts why (first one wins) and ends this process: gloo's peers then fail on the closed
        connections and name this rank through the store."""
        self._broken = why
        try:
            if self.store.add("dtrain/abort-count", 1) == 1:
                self.store.set("dtrain/abort", why)
        except Exception:
            pass
        sys.stderr.write(f"dtrain: rank {self.rank} aborts: {why}\n")
        sys.stderr.flush()
        os._exit(1)

    def transport_to(self, peer: int) -> str:
        return self.kind


class TorchRuntime:
    """dtrain.init(backend="torch"): a gloo process group on dtrain's rendezvous environment."""

    def __init__(self, env, timeout: float):
        from dtrain.comm.group import Group
        kind = os.environ.get("DTRAIN_TORCH_BACKEND", "gloo")
        if kind != "gloo":
            raise ConfigError(f"DTRAIN_TORCH_BACKEND={kind!r}: backend='torch' runs gloo only in this build "
                              "(dtrain.comm.api stages tensors through host memory, so NCCL would gain "
                              "nothing); unset it")
        if dist.is_initialized():
            raise ConfigError("torch.distributed is already initialised in this process: backend='torch' "
                              "makes its own process group; call dist.destroy_process_group() first")
        wait = datetime.timedelta(seconds=timeout)
        master = env.rank == 0
        fd = env.store_fd if master and env.store_fd >= 0 else None
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, master, wait,
                              master_listen_fd=fd, use_libuv=fd is None)
        dist.init_process_group("gloo", store=dist.PrefixStore("dtrain/pg", store), rank=env.rank,
                                world_size=env.world_size, timeout=wait)
        self.world = TorchWorld(store, env.rank, env.world_size, kind)
        self.timeout, self.backend = timeout, "torch"
        self.default = Group(TorchGroup(self, dist.group.WORLD, range(env.world_size), "world"))
        self._groups_made = 0

    def new_group(self, ranks: Sequence[int]):
        from dtrain.comm.group import Group
        ranks = [int(r) for r in ranks]
        self._groups_made += 1
        # torch's new_group is called by every rank, in the same order: as dtrain's is.
        pg = dist.new_group(ranks) if ranks else None  # an empty group: nobody can call it
        return Group(TorchGroup(self, pg, ranks, f"group{self._groups_made}[{','.join(map(str, ranks))}]"))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


__all__: List[str] = ["TorchRuntime"]
