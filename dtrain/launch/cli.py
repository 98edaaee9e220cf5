"""dtrain-run: start a script or command on N local processes with the env contract.

    dtrain-run -n 4 train.py --lr 0.1      # a .py file runs with this Python
    dtrain-run -n 2 python train.py        # any other command runs as given
    dtrain-run -n 2 -m package.module      # like python -m

One launcher per node (Slurm's srun, a Kubernetes pod per node; torchrun's flags):

    dtrain-run --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 -n 4 train.py   # on host A
    dtrain-run --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500 -n 4 train.py   # on host B

Export the same DTRAIN_JOB_TOKEN on every node so connections are authenticated.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import List, Optional

from dtrain.errors import DtrainError
from dtrain.launch.local import LocalJob, Node, job_token


def build_command(args: argparse.Namespace) -> List[str]:
    if args.module:
        return [sys.executable, "-m", args.module, *args.command]
    if not args.command:
        raise SystemExit("dtrain-run: nothing to run: give a script (train.py), a command, or -m module")
    first = args.command[0]
    if first.endswith(".py"):
        return [sys.executable, *args.command]
    return list(args.command)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtrain-run", description="Run a training script on N processes with dtrain's env contract.",
        epilog="Every output line is prefixed with its rank. When one rank fails, the others are stopped "
               "within seconds and the launcher exits with that rank's status.")
    p.add_argument("-n", "-np", "--np", "--nproc", "--nproc-per-node", dest="nprocs", type=int, default=None,
                   help="number of processes this launcher starts (per node with --nnodes; default 1); with "
                        "-H/--hostfile, the job's total, filling the hosts' slots in order (as horovodrun -np)")
    p.add_argument("-m", dest="module", help="run a module, as python -m does")
    p.add_argument("--no-prefix", action="store_true", help="do not prefix output lines with the rank")
    p.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="after a failure, start every rank again up to this many times (DTRAIN_RESTART_COUNT "
                        "tells the script which attempt it is; resume from your checkpoint)")
    p.add_argument("--grace", type=float, default=3.0,
                   help="after a rank fails, seconds the others get to see it before SIGTERM, and again before "
                        "SIGKILL (default 3)")
    g = p.add_argument_group("one launcher per node")
    g.add_argument("--nnodes", type=int, default=1, help="nodes in the job, each running this launcher (default 1)")
    g.add_argument("--node-rank", type=int, default=0, help="this node's number, 0..nnodes-1 (0: the master's host)")
    g.add_argument("--master-addr", default=None, help="node 0's address, reachable from every node")
    g.add_argument("--master-port", type=int, default=29500, help="the rendezvous port on node 0 (default 29500)")
    g.add_argument("--first-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by -H for its nodes
    g.add_argument("--world-size", type=int, default=None, help=argparse.SUPPRESS)
    h = p.add_argument_group("many hosts from here (as mpirun -H)")
    h.add_argument("-H", "--hosts", dest="hosts", default=None,
                   help="host1:slots,host2:slots: start a node launcher on each host (slots = its ranks)")
    h.add_argument("--hostfile", default=None, help="Open MPI hostfile: 'host slots=N' per line")
    h.add_argument("--remote-shell", default=None,
                   help="how to run a command on a host: run as CMD HOST 'COMMAND' (default: ssh -o BatchMode=yes; "
                        "with --mpi, mpirun's own rsh agent setting)")
    p.add_argument("--network-interface", default=None, metavar="IF",
                   help="the interface other hosts reach this one on (sets DTRAIN_IFNAME: under mpirun rank 0 "
                        "publishes its address; with --mpi also Open MPI's TCP interfaces)")
    h.add_argument("-x", dest="forward", action="append", default=[], metavar="NAME",
                   help="forward this environment variable to every host (repeatable)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the ranks as actors on a Ray cluster (auto, ray://host:10001, or local for a new "
                        "local instance)")
    m = p.add_argument_group("under mpirun")
    m.add_argument("--mpi", action="store_true", help="start the ranks with mpirun (Open MPI or MPICH) instead")
    m.add_argument("--mpi-flavor", choices=("openmpi", "mpich"), default=None,
                   help="which mpirun this is (default: from mpirun --version)")
    m.add_argument("--mpirun", default=None, help="the mpirun to use (default: mpirun on PATH)")
    m.add_argument("--dry-run", action="store_true", help="with --mpi: print the mpirun command line and exit")
    k = p.add_argument_group("horovodrun's flags", "horovodrun -np 4 -H a:2,b:2 python train.py runs as "
                             "dtrain-run -np 4 -H a:2,b:2 python train.py")
    k.add_argument("--timeline-filename", default=None, metavar="PATH",
                   help="hvd.start_timeline at init on rank 0 (sets HOROVOD_TIMELINE)")
    k.add_argument("--gloo", action="store_true", help="accepted (dtrain's native backend plays Gloo's part)")
    k.add_argument("-p", "--ssh-port", type=int, default=None, help="ssh port of the other hosts")
    p.add_argument("command", nargs=argparse.REMAINDER, help="script.py [args] | command [args]")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.timeline_filename:
        os.environ["HOROVOD_TIMELINE"] = args.timeline_filename  # the ranks' environment is copied from ours
    given = args.nprocs_given = args.nprocs
    if args.nprocs is None:
        args.nprocs = 1
    if args.nprocs < 1:
        raise SystemExit(f"dtrain-run: -n must be at least 1, got {args.nprocs}")
    if args.network_interface:
        os.environ["DTRAIN_IFNAME"] = args.network_interface  # every launch path passes DTRAIN_* on
    if args.max_restarts and (args.mpi or args.ray):
        raise SystemExit("dtrain-run: --max-restarts restarts ranks dtrain-run starts itself (one host, -H, "
                         "--hostfile); under --mpi or --ray use mpirun's or Ray's own restart handling")
    if args.mpi:
        return _under_mpirun(args)
    if args.ray:
        return _on_ray(args)
    if args.dry_run:
        raise SystemExit("dtrain-run: --dry-run goes with --mpi (it prints the mpirun command line)")
    if args.hosts or args.hostfile:
        return _many_hosts(args, given)
    node = None
    if args.nnodes != 1 or args.node_rank != 0 or args.master_addr is not None:
        node = Node(args.nnodes, args.node_rank, args.master_addr or "", args.master_port, args.first_rank,
                    args.world_size)
    if node is not None and node.nnodes > 1 and args.max_restarts:
        raise SystemExit("dtrain-run: --max-restarts with --nnodes would restart one node alone; every node must "
                         "restart together: use -H/--hostfile (which restarts all hosts) or the scheduler's restarts")
    if node is not None and node.nnodes > 1 and not os.environ.get("DTRAIN_JOB_TOKEN"):
        sys.stderr.write("dtrain-run: DTRAIN_JOB_TOKEN is not set, so the nodes' connections are not "
                         "authenticated: export the same random token on every node "
                         "(python -c 'import secrets; print(secrets.token_hex(32))')\n")
    command = build_command(args)
    # A node launcher started by -H is told its attempt by the launcher that restarts every host.
    base = int(os.environ.get("DTRAIN_RESTART_COUNT", "0") or 0)

    def attempt(k: int):
        os.environ["DTRAIN_RESTART_COUNT"] = str(base + k)  # the ranks' environment is copied from ours
        try:
            return LocalJob(command, args.nprocs, prefix=not args.no_prefix, grace=args.grace, node=node)
        except DtrainError as e:
            raise SystemExit(f"dtrain-run: {e}") from None

    sys.exit(_with_restarts(args, attempt, "all ranks"))


def _with_restarts(args: argparse.Namespace, make, what: str) -> int:
    """Runs make(k) (a job with start/stop/wait) for k = 0, 1, ... until it succeeds, times out,
    or --max-restarts is used up; signals stop the running job. Returns the last status."""
    if args.max_restarts < 0:
        raise SystemExit(f"dtrain-run: --max-restarts must be 0 or more, got {args.max_restarts}")
    current = [None]

    def forward(signum, _frame):
        # Ctrl-C (or a scheduler's SIGTERM) stops everyone, not just the launcher.
        sys.stderr.write(f"dtrain-run: got {signal.Signals(signum).name}, stopping {what}\n")
        if current[0] is not None:
            current[0].stop(signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = 0
    for k in range(args.max_restarts + 1):
        job = current[0] = make(k)
        try:
            job.start()
        except DtrainError as e:
            raise SystemExit(f"dtrain-run: {e}") from None
        code = job.wait(timeout=args.timeout)
        if code == 0 or code == 124 or k == args.max_restarts:
            break
        sys.stderr.write(f"dtrain-run: starting {what} again (restart {k + 1} of {args.max_restarts})\n")
        sys.stderr.flush()
    return code


def _under_mpirun(args: argparse.Namespace) -> int:
    """--mpi: the job as an mpirun command line, run (or printed with --dry-run)."""
    import shlex
    import subprocess

    from dtrain.launch import mpi
    try:
        exe = mpi.find_mpirun(args.mpirun) if not (args.dry_run and args.mpi_flavor) else (args.mpirun or "mpirun")
        flavor = args.mpi_flavor or mpi.flavor_of(exe)
        hosts = args.hosts
        n = args.nprocs
        if args.hosts or args.hostfile:
            from dtrain.launch import hosts as H
            listed = H.parse_hosts(args.hosts) if args.hosts else H.parse_hostfile(args.hostfile)
            if args.nprocs_given is None:
                n = sum(s for _, s in listed)  # as mpirun: every slot, unless -n says otherwise
        cmd = mpi.command(flavor, exe, n, build_command(args), hosts=hosts, hostfile=args.hostfile,
                          forward=args.forward, remote_shell=args.remote_shell, interface=args.network_interface)
    except DtrainError as e:
        raise SystemExit(f"dtrain-run: {e}") from None
    os.environ["DTRAIN_JOB_TOKEN"] = job_token()
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    sys.exit(subprocess.call(cmd))


def _on_ray(args: argparse.Namespace) -> int:
    """--ray ADDRESS: every rank an actor on the Ray cluster (dtrain.ray.run_script)."""
    import dtrain.ray
    from dtrain.launch.local import RankFailed
    command = build_command(args)
    command = [os.path.abspath(w) if w.endswith(".py") and os.path.exists(w) else w for w in command]
    try:
        ray = dtrain.ray._ray()
        if not ray.is_initialized():
            ray.init(address=None if args.ray == "local" else args.ray, include_dashboard=False)
        dtrain.ray.run_script(command, args.nprocs, timeout=args.timeout)
    except (RankFailed, DtrainError) as e:
        raise SystemExit(f"dtrain-run: {e}") from None
    sys.exit(0)


def _many_hosts(args: argparse.Namespace, total: Optional[int]) -> int:
    """-H / --hostfile: a node launcher on every host, started through the remote shell; `total`
    (-np) takes the first that many slots, host by host, as horovodrun does."""
    from dtrain.launch import hosts as H
    if args.hosts and args.hostfile:
        raise SystemExit("dtrain-run: give -H or --hostfile, not both")
    if args.nnodes != 1 or args.node_rank != 0:
        raise SystemExit("dtrain-run: -H/--hostfile start every node themselves; drop --nnodes/--node-rank")
    try:
        hosts = H.parse_hosts(args.hosts) if args.hosts else H.parse_hostfile(args.hostfile)
        hosts = H.take_slots(hosts, total)
    except DtrainError as e:
        raise SystemExit(f"dtrain-run: {e}") from None
    command = build_command(args)
    extra = ["--grace", str(args.grace)] + (["--no-prefix"] if args.no_prefix else [])
    token = job_token()

    def attempt(k: int):
        argvs = H.node_commands(hosts, command, args.master_addr or hosts[0][0], args.master_port, token,
                                _remote_shell(args), extra, args.forward, restart=k)
        return H.HostsJob(argvs, hosts, grace=args.grace)

    sys.exit(_with_restarts(args, attempt, "every host"))


def _remote_shell(args: argparse.Namespace) -> str:
    if args.remote_shell:
        return args.remote_shell
    return "ssh -o BatchMode=yes" + (f" -p {args.ssh_port}" if args.ssh_port else "")


if __name__ == "__main__":
    main()
