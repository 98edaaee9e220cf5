"""Horovod's PyTorch API on dtrain: change ``import horovod.torch as hvd`` to

    import dtrain.horovod as hvd

and run the script with ``dtrain-run -np 2 train.py`` (horovodrun's -np, -H and --hostfile
work as they do there), under ``mpirun -np 2 python train.py``, or under torchrun.

What is there: init/shutdown and the rank queries; allreduce, allgather, broadcast,
alltoall and reducescatter with their in-place, async and grouped forms, ops, scale
factors, names and autograd; poll/synchronize; barrier and join; process sets;
broadcast_parameters / broadcast_optimizer_state / broadcast_object / allgather_object;
DistributedOptimizer with Compression.none/fp16; SyncBatchNorm; the timeline.

Where it differs (see the README's Horovod section for the full list):

* Calls match across ranks in the order each rank makes them (as torch.distributed), not by
  name: every rank issues its collectives in the same order. A mismatch (different sizes,
  dtypes, roots) raises HorovodInternalError on the ranks involved and ends the job's
  communication, as a dead peer would.
* Compression.fp16 adds in float32 at every hop (Horovod adds in fp16): more exact.
* hvd.Adasum and hvd.init(comm=...) raise NotSupported; after hvd.join() only
  DistributedOptimizer steps are answered for the ranks still training.
"""

from dtrain.horovod.basics import (
    Adasum,
    Average,
    HorovodInternalError,
    HostsUpdatedInterrupt,
    Max,
    Min,
    NotSupported,
    ProcessSet,
    Product,
    ReduceOp,
    Sum,
    add_process_set,
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    global_process_set,
    init,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    remove_process_set,
    rocm_built,
    shutdown,
    size,
)
from dtrain.horovod.compression import Compression, Compressor
from dtrain.horovod.functions import allgather_object, broadcast_object, broadcast_optimizer_state, broadcast_parameters
from dtrain.horovod.ops import (
    allgather,
    allgather_async,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    alltoall,
    alltoall_async,
    barrier,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    grouped_allgather,
    grouped_allgather_async,
    grouped_allreduce,
    grouped_allreduce_,
    grouped_allreduce_async,
    grouped_allreduce_async_,
    grouped_reducescatter,
    grouped_reducescatter_async,
    join,
    poll,
    reducescatter,
    reducescatter_async,
    sparse_allreduce_async,
    synchronize,
)
from dtrain.horovod.optimizer import DistributedOptimizer
from dtrain.horovod.sync_batch_norm import SyncBatchNorm
from dtrain.horovod.timeline import start_timeline, stop_timeline

__all__ = [
    "Adasum", "Average", "HorovodInternalError", "HostsUpdatedInterrupt", "Max", "Min", "NotSupported", "ProcessSet",
    "Product", "ReduceOp", "Sum", "add_process_set", "ccl_built", "cross_rank", "cross_size", "cuda_built",
    "ddl_built", "gloo_built", "gloo_enabled", "global_process_set", "init", "is_homogeneous", "is_initialized",
    "local_rank", "local_size", "mpi_built", "mpi_enabled", "mpi_threads_supported", "nccl_built", "rank",
    "remove_process_set", "rocm_built", "shutdown", "size", "Compression", "Compressor", "allgather_object",
    "broadcast_object", "broadcast_optimizer_state", "broadcast_parameters", "allgather", "allgather_async",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "alltoall", "alltoall_async", "barrier",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "grouped_allgather", "grouped_allgather_async",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "grouped_reducescatter", "grouped_reducescatter_async", "join", "poll", "reducescatter", "reducescatter_async",
    "sparse_allreduce_async", "synchronize", "DistributedOptimizer", "SyncBatchNorm", "start_timeline",
    "stop_timeline",
]
