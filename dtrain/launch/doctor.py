"""`dtrain doctor`: before a big job, check what it needs and say what is wrong.

    dtrain doctor                                          # this host: extension, shared memory, 2-rank busbw
    dtrain doctor -H node1:4,node2:4 --link-rate 10gbit    # and every host, through ssh
    dtrain doctor --hostfile hosts --remote-shell ./agent --network-interface eth0

Checks, each with a fix when it fails:
  * this host: the native extension loads; /dev/shm has room; two local ranks reach each
    other over shared memory (a real allreduce); the tensor reader compiled against this
    torch is in the cache (built now when it is not);
  * every host (-H/--hostfile): the remote shell reaches it; its Python imports dtrain;
    the network interface has an address; node 0's master port is free;
  * bandwidth: a 64 MiB float32 allreduce, one rank per host (or two local ranks), as
    busbw; against --link-rate when given.
The exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import List, Optional, Tuple

Row = Tuple[str, bool, str, str]  # check, ok, what was found, how to fix it

_PROBE_BYTES = 64 << 20


def _probe(nbytes: int = _PROBE_BYTES, rounds: int = 5) -> dict:
    """Runs on every rank of the bandwidth job: busbw of an allreduce of `nbytes` float32."""
    import torch

    import dtrain
    dtrain.init(timeout=60)
    n = dtrain.world_size()
    world = dtrain.comm.group.current().world
    t = torch.ones(nbytes // 4)
    dtrain.allreduce(t)  # warm-up: connections, pages
    times = []
    for _ in range(rounds):
        t.fill_(1.0)
        dtrain.barrier()
        start = time.perf_counter()
        dtrain.allreduce(t)
        times.append(time.perf_counter() - start)
    best = min(times)
    out = {"ranks": n, "seconds": best, "busbw": 2 * (n - 1) / n * nbytes / best if n > 1 else 0.0,
           "transports": sorted({world.transport_to(j) for j in range(n) if j != dtrain.rank()}),
           "correct": bool((t == n).all())}
    r = dtrain.rank()
    dtrain.shutdown()
    return out if r == 0 else {}


def _fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.2f} GB/s ({bytes_per_s * 8 / 1e9:.1f} Gbit/s)"


def local_checks() -> List[Row]:
    rows: List[Row] = []
    try:
        from dtrain import _C
        rows.append(("native extension", True, f"loaded ({_C.__name__})", ""))
    except ImportError as e:
        rows.append(("native extension", False, str(e), "reinstall: pip install -e . (needs a C++17 compiler)"))
        return rows
    try:
        st = os.statvfs("/dev/shm")
        free = st.f_bavail * st.f_frsize
        ok = free >= 64 << 20
        rows.append(("/dev/shm space", ok, f"{free / 2**20:.0f} MiB free",
                     "" if ok else "enlarge /dev/shm (docker run --shm-size=1g, or mount -o remount,size=1G /dev/shm)"))
    except OSError as e:
        rows.append(("/dev/shm space", False, str(e), "mount a tmpfs at /dev/shm"))
    return rows


def tensor_reader(wait_s: float = 180.0) -> List[Row]:
    """The tensor reader compiled against this torch (dtrain.ops._torch_reader): found in the
    cache, or compiled now, so the job's first steps do not run without it. Informational:
    without it lists are read through torch's Python API, the same results more slowly."""
    import torch

    from dtrain.ops import _torch_reader, fusion
    start = time.monotonic()
    fusion.pack([torch.zeros(1)])  # the first list read starts it
    _torch_reader.wait(wait_s)
    state, took = _torch_reader.state(), time.monotonic() - start
    if state.startswith("in use"):
        found = state + (f", compiled in {took:.0f} s" if took > 1 else "")
    elif state.startswith("failed"):
        found = (f"not built ({state[len('failed: '):]}); tensor lists are read through torch's Python API "
                 "(~10x slower per tensor). A C++ compiler and torch's headers build it")
    else:
        found = state if state != "compiling" else f"still compiling after {wait_s:.0f} s"
    return [("tensor reader", True, found, "")]


def local_bandwidth() -> List[Row]:
    import dtrain.launch
    try:
        res = dtrain.launch.run(_probe, nprocs=2, timeout=120)[0]
    except Exception as e:  # noqa: BLE001 - the doctor reports every failure as a row
        return [("2 local ranks", False, f"{type(e).__name__}: {str(e).splitlines()[0]}",
                 "run the failing step alone: dtrain-run -n 2 python -c 'import dtrain; dtrain.init()'")]
    ok = res["correct"] and res["transports"] == ["shm"]
    return [("2 local ranks", ok, f"allreduce over {'/'.join(res['transports'])}, busbw {_fmt_rate(res['busbw'])}",
             "" if ok else "ranks of one host should use shared memory: check DTRAIN_TRANSPORT and /dev/shm")]


def _remote(agent: List[str], host: str, command: List[str], timeout: float) -> Tuple[int, str]:
    argv = [*agent, host, shlex.join(command)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 124, f"no answer in {timeout:.0f} s"
    except OSError as e:
        return 127, f"{argv[0]}: {e.strerror}"
    return p.returncode, (p.stdout + p.stderr).strip()


def host_checks(hosts, remote_shell: str, interface: Optional[str], master_port: int) -> List[Row]:
    agent = shlex.split(remote_shell)
    rows: List[Row] = []
    for k, (host, _) in enumerate(hosts):
        code, out = _remote(agent, host, ["true"], 15)
        if code != 0:
            rows.append((f"{host}: reachable", False, out.splitlines()[-1] if out else f"exit {code}",
                         f"check that `{remote_shell} {host} true` works (keys, host name, --remote-shell)"))
            continue
        rows.append((f"{host}: reachable", True, f"through {agent[0]}", ""))
        code, out = _remote(agent, host, [sys.executable, "-c", "import dtrain; print(dtrain.__version__)"], 60)
        rows.append((f"{host}: dtrain", code == 0, f"{sys.executable}: dtrain {out}" if code == 0 else out[-200:],
                     "" if code == 0 else f"install dtrain at the same path on {host} ({sys.executable})"))
        if code != 0:
            continue
        if interface:
            code, out = _remote(agent, host, [sys.executable, "-c", "import sys; from dtrain.comm.rendezvous "
                                              "import interface_address as a; print(a(sys.argv[1]))", interface], 30)
            rows.append((f"{host}: interface {interface}", code == 0, out.splitlines()[-1] if out else "",
                         "" if code == 0 else "pick the interface the hosts share with --network-interface"))
        if k == 0:
            code, out = _remote(agent, host, [sys.executable, "-c", "import socket, sys; s = socket.socket(); "
                                              "s.bind(('', int(sys.argv[1]))); print('free')", str(master_port)], 30)
            rows.append((f"{host}: master port {master_port}", code == 0, "free" if code == 0 else
                         out.splitlines()[-1] if out else "in use", "" if code == 0 else
                         "choose another --master-port"))
    return rows


def hosts_bandwidth(hosts, remote_shell: str, master_addr: str, master_port: int,
                    link_rate: Optional[float]) -> List[Row]:
    """One rank per host through dtrain-run -H; rank 0 writes its result where we can read it."""
    import tempfile
    out_dir = tempfile.mkdtemp(prefix="dtrain-doctor-")
    out = os.path.join(out_dir, "busbw.json")
    code = (f"import json, sys; from dtrain.launch.doctor import _probe; r = _probe(); "
            f"r and json.dump(r, open({out!r}, 'w'))")
    argv = [sys.executable, "-m", "dtrain.launch", "-H", ",".join(f"{h}:1" for h, _ in hosts), "--remote-shell",
            remote_shell, "--master-addr", master_addr, "--master-port", str(master_port), "--timeout", "150",
            sys.executable, "-c", code]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=200)
    if p.returncode != 0 or not os.path.exists(out):
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return [("bandwidth between hosts", False, last,
                 "fix the rows above first; then run the same job by hand: dtrain-run -H ... python -c "
                 "'import dtrain; dtrain.init()'")]
    with open(out) as f:
        res = json.load(f)
    detail = f"{len(hosts)} hosts, busbw {_fmt_rate(res['busbw'])}"
    ok, fix = res["correct"], ""
    if link_rate:
        frac = res["busbw"] / link_rate
        detail += f" = {frac:.0%} of the {link_rate * 8 / 1e9:g} Gbit/s link"
        if frac < 0.5:
            ok, fix = False, ("under half the link: check the interface (--network-interface), MTU, and other "
                              "traffic on the link")
    return [("bandwidth between hosts", ok, detail, fix)]


def table(rows: List[Row]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = []
    for name, ok, detail, fix in rows:
        lines.append(f"{'ok ' if ok else 'BAD'}  {name.ljust(width)}  {detail}")
        if not ok and fix:
            lines.append(f"     {' ' * width}  fix: {fix}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    from dtrain.testing.cluster import rate_bytes_per_s
    p = argparse.ArgumentParser(prog="dtrain doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("-H", "--hosts", default=None, help="host1:slots,host2:slots, as dtrain-run -H")
    p.add_argument("--hostfile", default=None, help="Open MPI hostfile, as dtrain-run --hostfile")
    p.add_argument("--remote-shell", default="ssh -o BatchMode=yes", help="as dtrain-run --remote-shell")
    p.add_argument("--network-interface", default=None, metavar="IF", help="check this interface on every host")
    p.add_argument("--master-addr", default=None, help="node 0's address (default: the first host's name)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--link-rate", default=None, help="the link's rate, as tc writes it (10gbit), to compare busbw")
    args = p.parse_args(argv)
    link = rate_bytes_per_s(args.link_rate) if args.link_rate else None
    rows = local_checks()
    if args.hosts or args.hostfile:
        from dtrain.errors import DtrainError
        from dtrain.launch import hosts as H
        try:
            hosts = H.parse_hosts(args.hosts) if args.hosts else H.parse_hostfile(args.hostfile)
        except DtrainError as e:
            raise SystemExit(f"dtrain doctor: {e}") from None
        rows += host_checks(hosts, args.remote_shell, args.network_interface, args.master_port)
        if all(ok for _, ok, _, _ in rows):
            rows += hosts_bandwidth(hosts, args.remote_shell, args.master_addr or hosts[0][0], args.master_port, link)
    elif all(ok for _, ok, _, _ in rows):
        rows += local_bandwidth()
    if rows[0][1]:  # the native extension loads
        rows += tensor_reader()
    print(table(rows))
    bad = sum(not ok for _, ok, _, _ in rows)
    print(f"\n{bad} problem(s) found" if bad else "\nall checks passed")
    return 1 if bad else 0


def entry(argv: Optional[List[str]] = None) -> None:
    """The `dtrain` command: `dtrain doctor ...`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "doctor":
        raise SystemExit("usage: dtrain doctor [-H hosts | --hostfile FILE] [--remote-shell CMD] "
                         "[--network-interface IF] [--link-rate 10gbit]")
    sys.exit(main(argv[1:]))


if __name__ == "__main__":
    entry()
