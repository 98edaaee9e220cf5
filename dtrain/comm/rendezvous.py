"""The env contract: who am I, how many are we, and where is rank 0.

`dtrain.init()` reads, in this order: dtrain-run (and Ray) variables, torchrun's,
Open MPI's, MPICH/Hydra's (PMI_*), Slurm's. With none of them set it is a world
of one. Under mpirun without MASTER_ADDR, rank 0 opens the rendezvous port and
publishes its address and a fresh job token over MPI itself (needs mpi4py).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import warnings
from typing import Mapping, Optional

from dtrain.errors import ConfigError


@dataclasses.dataclass
class Env:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    token: str = ""
    store_fd: int = -1          # rank 0: a listening socket handed over by the launcher
    host_id: str = ""           # ranks with equal host ids use shared memory
    launcher: str = "none"      # dtrain-run | torchrun | openmpi | mpich | slurm | none


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not an integer; fix the launcher's environment") from None


def _first(env: Mapping[str, str], *names: str) -> Optional[str]:
    for n in names:
        if env.get(n):
            return env[n]
    return None


def from_environ(env: Mapping[str, str] = os.environ) -> Env:
    """Reads the launcher's variables. Raises ConfigError naming what is missing."""
    e = Env()
    if "DTRAIN_RANK" in env:
        e.launcher = "dtrain-run"
        e.rank, e.world_size = _int(env, "DTRAIN_RANK"), _int(env, "DTRAIN_WORLD_SIZE")
        e.local_rank = _int(env, "DTRAIN_LOCAL_RANK") if "DTRAIN_LOCAL_RANK" in env else e.rank
        e.local_size = _int(env, "DTRAIN_LOCAL_SIZE") if "DTRAIN_LOCAL_SIZE" in env else e.world_size
    elif "RANK" in env and "WORLD_SIZE" in env:
        e.launcher = "torchrun"
        e.rank, e.world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        e.local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        e.local_size = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else e.world_size
    elif "OMPI_COMM_WORLD_RANK" in env:
        e.launcher = "openmpi"
        e.rank, e.world_size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        e.local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
        e.local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else 1
    elif "PMI_RANK" in env:
        e.launcher = "mpich"
        e.rank, e.world_size = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        e.local_rank = _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0
        e.local_size = _int(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else 1
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        e.launcher = "slurm"
        e.rank, e.world_size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        e.local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        tasks = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        e.local_size = int(tasks) if tasks.isdigit() else 1
    else:
        return e

    if not (0 <= e.rank < e.world_size):
        raise ConfigError(f"rank {e.rank} is outside a world of size {e.world_size} "
                          f"(launcher: {e.launcher}); check the launcher's environment")
    addr = _first(env, "DTRAIN_MASTER_ADDR", "MASTER_ADDR")
    port = _first(env, "DTRAIN_MASTER_PORT", "MASTER_PORT")
    e.token = env.get("DTRAIN_JOB_TOKEN", "")
    e.host_id = env.get("DTRAIN_HOST_ID", "")
    if e.rank == 0 and env.get("DTRAIN_STORE_FD"):
        e.store_fd = _listening_fd(_int(env, "DTRAIN_STORE_FD"))
    if e.world_size > 1 and (addr is None or port is None):
        if e.launcher in ("openmpi", "mpich"):
            return _bootstrap_over_mpi(e)
        raise ConfigError(f"{e.launcher} started rank {e.rank} of {e.world_size} but MASTER_ADDR/MASTER_PORT "
                          "(or DTRAIN_MASTER_ADDR/PORT) are not set: export the address and a free port "
                          "of rank 0's host, or launch with dtrain-run")
    if addr is not None:
        e.master_addr, e.master_port = addr, int(port)
    if e.world_size > 1 and not e.token:
        # torchrun and Slurm carry no secret; derive one so the handshake still runs, and say so.
        e.token = f"dtrain-unauthenticated:{e.master_addr}:{e.master_port}"
        if e.rank == 0:
            warnings.warn("DTRAIN_JOB_TOKEN is not set, so connections are not authenticated: "
                          "export the same random DTRAIN_JOB_TOKEN on every rank (dtrain-run does this)",
                          stacklevel=3)
    return e


def _listening_fd(fd: int) -> int:
    """Checks that the launcher's DTRAIN_STORE_FD is a listening TCP socket in this process."""
    try:
        s = socket.socket(fileno=fd)
        ok = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        s.detach()
    except OSError:
        ok = False
    if not ok:
        raise ConfigError(f"DTRAIN_STORE_FD={fd} is not a listening socket in this process: it is set only by "
                          "dtrain-run for rank 0; unset it when starting ranks yourself")
    return fd


def _bootstrap_over_mpi(e: Env) -> Env:
    """Rank 0 opens the store port and sends (address, port, token) to everyone over MPI."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError(f"started by mpirun ({e.launcher}) without MASTER_ADDR/MASTER_PORT: install "
                          "mpi4py (pip install 'dtrain[mpi]') so rank 0 can publish its address over MPI, "
                          "or export MASTER_ADDR and MASTER_PORT") from None
    info = None
    if e.rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        e.store_fd = listener.detach()
        info = (_host_address(), port, e.token or secrets.token_hex(32))
    info = MPI.COMM_WORLD.bcast(info, root=0)
    e.master_addr, e.master_port, e.token = info[0], int(info[1]), info[2]
    return e


def _host_address() -> str:
    """The address rank 0 publishes: DTRAIN_HOST_ADDR, else DTRAIN_IFNAME's IPv4 address, else
    this host's name as it resolves (which may be a loopback alias other hosts cannot reach)."""
    if os.environ.get("DTRAIN_HOST_ADDR"):
        return os.environ["DTRAIN_HOST_ADDR"]
    if os.environ.get("DTRAIN_IFNAME"):
        return interface_address(os.environ["DTRAIN_IFNAME"])
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (Linux). Raises ConfigError naming the
    interfaces there are when it has none."""
    import fcntl
    import struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        names = sorted(n for _, n in socket.if_nameindex())
        raise ConfigError(f"DTRAIN_IFNAME={name!r} has no IPv4 address on this host (interfaces: "
                          f"{', '.join(names)}); name the interface the other hosts reach this one on") from None
    finally:
        s.close()
