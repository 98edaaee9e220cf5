"""dtrain: distributed training for PyTorch.

    import dtrain
    dtrain.init()
    dtrain.allreduce(tensor, op="avg")
"""

from dtrain import errors  # noqa: F401  (first: the C++ module maps its errors onto these classes)
from dtrain.errors import CommError, CommTimeout, ConfigError, DataError, DtrainError, RendezvousError
from dtrain.comm import (
    Group,
    Work,
    allgather,
    allreduce,
    alltoall,
    barrier,
    broadcast,
    init,
    is_initialized,
    local_rank,
    local_size,
    new_group,
    rank,
    recv,
    reduce_scatter,
    send,
    sendrecv,
    shutdown,
    world_size,
)

from dtrain.parallel import AllReduceStrategy, LocalStrategy, ParameterServerStrategy, PipelineStrategy, Strategy

__version__ = "0.1.0"

__all__ = [
    "CommError", "CommTimeout", "ConfigError", "DataError", "DtrainError", "RendezvousError",
    "Group", "Work", "allgather", "allreduce", "alltoall", "barrier", "broadcast", "init",
    "is_initialized", "local_rank", "local_size", "new_group", "rank", "recv", "reduce_scatter",
    "send", "sendrecv", "shutdown", "world_size", "AllReduceStrategy", "LocalStrategy", "ParameterServerStrategy", "PipelineStrategy", "Strategy",
]
