"""Process groups and collectives (see dtrain.comm.api for the functions)."""

from dtrain.comm.api import (
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
from dtrain.comm.group import Group, Work

__all__ = [
    "Group", "Work", "allgather", "allreduce", "alltoall", "barrier", "broadcast", "init",
    "is_initialized", "local_rank", "local_size", "new_group", "rank", "recv", "reduce_scatter",
    "send", "sendrecv", "shutdown", "world_size",
]
