"""`dtrain-run --mpi`: the same job started by mpirun (Open MPI or MPICH's Hydra).

dtrain-run builds the mpirun command line: process count, hosts, the environment every
rank needs (the job token, PYTHONPATH, DTRAIN_* settings, and -x names), binding off
(dtrain's ranks run their own threads), and Open MPI's root flags when run as root.
`--dry-run` prints it instead of running it. The ranks find each other as under any
mpirun: dtrain.init reads OMPI_*/PMI_* and bootstraps over MPI (mpi4py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import List, Optional, Sequence

from dtrain.errors import DtrainError

FLAVORS = ("openmpi", "mpich")


def find_mpirun(explicit: Optional[str] = None) -> str:
    exe = explicit or shutil.which("mpirun") or shutil.which("mpiexec")
    if not exe:
        raise DtrainError("--mpi needs mpirun on PATH: apt-get install openmpi-bin libopenmpi-dev (or MPICH), "
                          "or pass --mpirun PATH")
    return exe


def flavor_of(mpirun: str) -> str:
    """openmpi or mpich, from `mpirun --version`."""
    try:
        text = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DtrainError(f"could not run {mpirun} --version ({e}); say which MPI with --mpi-flavor") from None
    if "Open MPI" in text or "OpenRTE" in text:
        return "openmpi"
    if re.search(r"HYDRA|MPICH|Intel\(R\) MPI", text):
        return "mpich"
    raise DtrainError(f"{mpirun} --version names neither Open MPI nor MPICH: {text.strip()[:200]!r}; "
                      "say which with --mpi-flavor openmpi|mpich")


def forwarded_names(extra: Sequence[str] = ()) -> List[str]:
    """The environment each rank needs from here, in the order given to mpirun."""
    keep = ["DTRAIN_JOB_TOKEN", "PYTHONPATH", "PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV"]
    keep += sorted(k for k in os.environ if k.startswith("DTRAIN_") and k not in keep
                   and k not in ("DTRAIN_STORE_FD", "DTRAIN_RANK", "DTRAIN_WORLD_SIZE", "DTRAIN_LOCAL_RANK",
                                 "DTRAIN_LOCAL_SIZE", "DTRAIN_MASTER_ADDR", "DTRAIN_MASTER_PORT"))
    names = [k for k in keep if k in os.environ or k == "DTRAIN_JOB_TOKEN"]
    return names + [k for k in extra if k not in names]


def command(flavor: str, mpirun: str, nprocs: int, program: Sequence[str], hosts: Optional[str] = None,
            hostfile: Optional[str] = None, forward: Sequence[str] = (), as_root: Optional[bool] = None,
            remote_shell: Optional[str] = None, interface: Optional[str] = None) -> List[str]:
    """The mpirun argv for `program` on `nprocs` ranks. `remote_shell` replaces the agent mpirun
    starts its daemons on other hosts with (ssh); `interface` is the network interface between hosts."""
    if flavor not in FLAVORS:
        raise DtrainError(f"--mpi-flavor {flavor!r}: choose {' or '.join(FLAVORS)}")
    if nprocs < 1:
        raise DtrainError(f"-n must be at least 1, got {nprocs}")
    names = forwarded_names(forward)
    as_root = os.geteuid() == 0 if as_root is None else as_root
    if flavor == "openmpi":
        cmd = [mpirun, "-np", str(nprocs)]
        if as_root:
            cmd.append("--allow-run-as-root")
        cmd += ["--bind-to", "none", "--map-by", "slot", "--tag-output"]
        if hosts:
            cmd += ["-H", hosts]
        if hostfile:
            cmd += ["--hostfile", hostfile]
        if not hosts and not hostfile:
            cmd.append("--oversubscribe")  # one host: as many ranks as asked, whatever the core count
        if remote_shell:
            cmd += ["--mca", "plm_rsh_agent", remote_shell]
        if interface:
            cmd += ["--mca", "btl_tcp_if_include", interface, "--mca", "oob_tcp_if_include", interface]
        for k in names:
            cmd += ["-x", k]
    else:
        cmd = [mpirun, "-n", str(nprocs), "-bind-to", "none", "-prepend-rank"]
        if hosts:
            cmd += ["-hosts", hosts]
        if hostfile:
            cmd += ["-f", hostfile]
        if remote_shell:
            cmd += ["-launcher", "ssh", "-launcher-exec", remote_shell]
        if interface:
            cmd += ["-iface", interface]
        cmd += ["-genvlist", ",".join(names)]
    return cmd + list(program)
