"""Horovod's process model over dtrain's: init, ranks, process sets, ops, errors."""

from __future__ import annotations

import enum
import warnings
from typing import List, Optional

import torch

import dtrain
from dtrain.comm.group import Group
from dtrain.errors import CommError, ConfigError


class HorovodInternalError(CommError):
    """A collective failed: a peer died, or ranks passed different shapes, dtypes or roots.
    A RuntimeError (as Horovod's) and a dtrain.CommError; the message names the ranks."""


class HostsUpdatedInterrupt(RuntimeError):
    """Horovod's elastic-mode signal; dtrain.horovod never raises it (no elastic mode)."""


class NotSupported(ConfigError, NotImplementedError):
    """A Horovod feature dtrain.horovod does not provide; the message says what to use instead."""


class ReduceOp(enum.IntEnum):
    """Horovod's reduction ops, with Horovod's integer values (hvd.Average == 0)."""
    Average = 0
    Sum = 1
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5


Average, Sum, Adasum, Min, Max, Product = (ReduceOp.Average, ReduceOp.Sum, ReduceOp.Adasum, ReduceOp.Min,
                                           ReduceOp.Max, ReduceOp.Product)


def resolve_op(op, average) -> ReduceOp:
    """Horovod's rule for the deprecated `average=` next to `op=` (op defaults to Average)."""
    if op is not None and average is not None:
        raise ConfigError("the op parameter supersedes average: give only one of them "
                          f"(got op={op!r}, average={average!r})")
    if average is not None:
        warnings.warn("average= is deprecated in Horovod's API: use op=hvd.Average or op=hvd.Sum",
                      DeprecationWarning, stacklevel=3)
        return Average if average else Sum
    if op is None:
        return Average
    try:
        return ReduceOp(op)
    except ValueError:
        raise ConfigError(f"unknown reduction op {op!r}: use hvd.Average, hvd.Sum, hvd.Min, hvd.Max or "
                          "hvd.Product") from None


class ProcessSet:
    """Some of the job's ranks, for collectives over them alone (``process_set=``).

    Every rank creates the same sets in the same order: pass them to ``hvd.init(process_sets=
    [...])`` or register each with ``hvd.add_process_set`` on every rank.

    Example (4 ranks)::

        evens = hvd.ProcessSet([0, 2])
        hvd.init(process_sets=[evens])
        if evens.included():
            hvd.allreduce(t, process_set=evens)   # ranks 0 and 2 average together
    """

    def __init__(self, ranks_or_comm):
        if not isinstance(ranks_or_comm, (list, tuple, range)):
            raise NotSupported("ProcessSet takes a list of ranks here (an mpi4py communicator needs Horovod's "
                               f"MPI controller); got {type(ranks_or_comm).__name__}")
        ranks = [int(r) for r in ranks_or_comm]
        if sorted(set(ranks)) != sorted(ranks):
            raise ConfigError(f"ProcessSet ranks {ranks} repeat a rank: list each once")
        self.ranks: List[int] = sorted(ranks)
        self.process_set_id: Optional[int] = None
        self.group: Optional[Group] = None  # the dtrain group, once registered

    def _registered(self) -> Group:
        if self.process_set_id is None:
            raise ConfigError(f"process set {self.ranks} is not registered: pass it to hvd.init(process_sets=[...]) "
                              "or call hvd.add_process_set(it) on every rank first")
        return self.group

    def size(self) -> Optional[int]:
        return len(self.ranks) if self.process_set_id is not None else None

    def rank(self) -> Optional[int]:
        """This process's rank within the set (None if not a member or not registered)."""
        if self.process_set_id is None or dtrain.rank() not in self.ranks:
            return None
        return self.ranks.index(dtrain.rank())

    def included(self) -> Optional[bool]:
        return None if self.process_set_id is None else dtrain.rank() in self.ranks

    def __eq__(self, other) -> bool:
        return isinstance(other, ProcessSet) and other.ranks == self.ranks and \
            other.process_set_id == self.process_set_id

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


class _GlobalProcessSet(ProcessSet):
    def __init__(self):
        self.ranks, self.process_set_id, self.group = [], 0, None

    def size(self):
        return dtrain.world_size() if dtrain.is_initialized() else None

    def rank(self):
        return dtrain.rank() if dtrain.is_initialized() else None

    def included(self):
        return True if dtrain.is_initialized() else None

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id=0, ranks=all {self.size()})"


global_process_set = _GlobalProcessSet()


class _Job:
    """What hvd.init() learned: the cross (one rank per host) layout and the process sets."""

    initialized = False
    started_dtrain = False
    left_a_job = False  # hvd.shutdown() left a multi-rank job: it cannot be joined again
    cross_rank = 0
    cross_size = 1
    homogeneous = True
    sets: dict = {}
    next_set_id = 1


def _require_init() -> None:
    if not _Job.initialized:
        raise ConfigError("Horovod has not been initialized; use hvd.init().")


def init(comm=None, process_sets=None) -> None:
    """Joins the job that dtrain-run, horovodrun-style flags, mpirun or torchrun started.

    Args:
        comm: None (the whole job). A list of ranks or an mpi4py communicator (Horovod's way to
            run on a subset) is refused: start only those ranks instead.
        process_sets: ProcessSet objects to register (every rank passes the same list), or
            "dynamic" (sets registered later with add_process_set, which is always allowed here).
    """
    if comm is not None:
        raise NotSupported("hvd.init(comm=...) runs Horovod on part of an MPI job; dtrain.horovod joins the "
                           "whole job: start only the ranks you want (dtrain-run -np N)")
    if _Job.initialized:
        return
    if not dtrain.is_initialized():
        if _Job.left_a_job:
            raise NotSupported("hvd.init() after hvd.shutdown() in a multi-rank job: the launcher's rendezvous "
                               "is spent; dtrain.horovod joins a job once per process (Horovod's elastic "
                               "re-init is not provided)")
        dtrain.init()
        _Job.started_dtrain = True
    n, me = dtrain.world_size(), dtrain.rank()
    # Horovod's cross communicator joins the ranks with this rank's local rank, one per host.
    layout = torch.tensor([dtrain.local_rank(), dtrain.local_size()], dtype=torch.int64)
    every = dtrain.allgather(layout.reshape(1, 2)) if n > 1 else layout.reshape(1, 2)
    local = every[:, 0].tolist()
    _Job.cross_rank = sum(1 for r in range(me) if local[r] == local[me])
    _Job.cross_size = sum(1 for r in range(n) if local[r] == local[me])
    _Job.homogeneous = len(set(every[:, 1].tolist())) == 1
    _Job.sets = {0: global_process_set}
    _Job.next_set_id = 1
    _Job.initialized = True
    if process_sets is not None and process_sets != "dynamic":
        for ps in process_sets:
            add_process_set(ps)
    from dtrain.horovod import timeline
    timeline.from_env()


def shutdown() -> None:
    """Leaves the job (every rank calls it); hvd.init() may be called again afterwards."""
    if not _Job.initialized:
        return
    from dtrain.horovod import handles, timeline
    handles.forget_handles()
    timeline.stop_timeline()
    for ps in list(_Job.sets.values()):
        if ps is not global_process_set:
            ps.process_set_id, ps.group = None, None
    _Job.sets = {}
    _Job.initialized = False
    if _Job.started_dtrain:
        _Job.left_a_job = dtrain.world_size() > 1
        dtrain.shutdown()
        _Job.started_dtrain = False


def is_initialized() -> bool:
    return _Job.initialized


def add_process_set(process_set) -> ProcessSet:
    """Registers a set on every rank (all ranks call it, in the same order). Returns the set."""
    _require_init()
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    if ps.process_set_id is not None:
        raise ConfigError(f"{ps!r} is registered already: remove_process_set(it) first")
    n = dtrain.world_size()
    bad = [r for r in ps.ranks if not 0 <= r < n]
    if bad or not ps.ranks:
        raise ConfigError(f"ProcessSet ranks {ps.ranks} are out of range or empty: this job has ranks 0..{n - 1}")
    for other in _Job.sets.values():
        if other is not global_process_set and other.ranks == ps.ranks:
            raise ConfigError(f"a process set with ranks {ps.ranks} exists already ({other!r})")
    ps.group = dtrain.new_group(ps.ranks)
    ps.process_set_id = _Job.next_set_id
    _Job.next_set_id += 1
    _Job.sets[ps.process_set_id] = ps
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregisters a set (all ranks call it). Returns False if it was not registered."""
    _require_init()
    if process_set is global_process_set:
        raise ConfigError("the global process set cannot be removed")
    if _Job.sets.get(process_set.process_set_id) is not process_set:
        return False
    del _Job.sets[process_set.process_set_id]
    process_set.process_set_id, process_set.group = None, None
    return True


def group_of(process_set) -> Optional[Group]:
    """The dtrain group behind `process_set` (None: the world)."""
    _require_init()
    if process_set is None or process_set is global_process_set:
        return None
    if not isinstance(process_set, ProcessSet):
        raise ConfigError(f"process_set must be an hvd.ProcessSet, got {type(process_set).__name__}")
    return process_set._registered()


def set_size(process_set) -> int:
    g = group_of(process_set)
    return dtrain.world_size() if g is None else g.size


def set_rank(process_set) -> int:
    g = group_of(process_set)
    return dtrain.rank() if g is None else g.rank


def rank() -> int:
    _require_init()
    return dtrain.rank()


def size() -> int:
    _require_init()
    return dtrain.world_size()


def local_rank() -> int:
    _require_init()
    return dtrain.local_rank()


def local_size() -> int:
    _require_init()
    return dtrain.local_size()


def cross_rank() -> int:
    """This rank's index among the ranks with its local rank (one per host): the host's index."""
    _require_init()
    return _Job.cross_rank


def cross_size() -> int:
    """How many ranks share this rank's local rank: the number of hosts, when each runs as many."""
    _require_init()
    return _Job.cross_size


def is_homogeneous() -> bool:
    """True when every host runs the same number of ranks."""
    _require_init()
    return _Job.homogeneous


def mpi_threads_supported() -> bool:
    _require_init()
    return False


def mpi_enabled() -> bool:
    """True when the job talks through MPI (dtrain's 'mpi' backend); the native backend does not."""
    return dtrain.is_initialized() and getattr(dtrain.comm.group.current(), "backend", "") == "mpi"


def mpi_built() -> bool:
    import importlib.util
    return importlib.util.find_spec("mpi4py") is not None


def gloo_enabled() -> bool:
    """Horovod's Gloo controller is what runs without MPI; dtrain's native backend takes its place."""
    return dtrain.is_initialized() and not mpi_enabled()


def gloo_built() -> bool:
    return True


def nccl_built() -> int:
    return 0


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    return bool(torch.cuda.is_available())


def rocm_built() -> bool:
    return False


def check_root(root_rank, process_set, what: str) -> int:
    """root_rank as an int within the set, or ConfigError naming the valid range."""
    n = set_size(process_set)
    if isinstance(root_rank, bool) or not isinstance(root_rank, (int, torch.Tensor)) or \
            (isinstance(root_rank, torch.Tensor) and root_rank.numel() != 1):
        raise ConfigError(f"{what}: root_rank must be an int, got {root_rank!r}")
    root = int(root_rank)
    if not 0 <= root < n:
        raise ConfigError(f"{what}: root_rank {root} is out of range: this process set has {n} ranks, "
                          f"so use 0..{n - 1}")
    return root


__all__ = [
    "HorovodInternalError", "HostsUpdatedInterrupt", "NotSupported", "ReduceOp", "Average", "Sum", "Adasum",
    "Min", "Max", "Product", "ProcessSet", "global_process_set", "init", "shutdown", "is_initialized",
    "add_process_set", "remove_process_set", "rank", "size", "local_rank", "local_size", "cross_rank",
    "cross_size", "is_homogeneous", "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled",
    "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built", "rocm_built",
]
