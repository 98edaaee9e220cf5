"""Starting the peers that benchmarks compare dtrain with."""

import os
import socket


def init_gloo(timeout_s: float = 120.0):
    """torch.distributed with gloo on a port of its own.

    dtrain's launcher hands rank 0 a listening socket for dtrain's store; reusing that
    port for torch's TCPStore races (rank 1 may connect to the closing socket, and
    then waits forever). So dtrain, already wired up, carries a fresh port from rank 0
    to the others, and torch starts its own store there.
    """
    import datetime

    import torch
    import torch.distributed as dist

    import dtrain
    dtrain.init(timeout=timeout_s)
    # On the multi-host test bed rank 0's address is DTRAIN_MASTER_ADDR; on one host, loopback.
    addr = os.environ.get("DTRAIN_MASTER_ADDR", "127.0.0.1")
    port = torch.zeros(1, dtype=torch.int64)
    if dtrain.rank() == 0:
        with socket.socket() as s:
            s.bind((addr, 0))
            port[0] = s.getsockname()[1]
    dtrain.broadcast(port, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{int(port)}", rank=dtrain.rank(),
                           world_size=dtrain.world_size(), timeout=datetime.timedelta(seconds=timeout_s))
    os.environ["MASTER_PORT"] = str(int(port))
    return dist


def close_gloo():
    import torch.distributed as dist

    import dtrain
    dist.destroy_process_group()
    dtrain.shutdown()
