"""Allreduce bandwidth and latency: dtrain native (fp32, fp16 wire, bf16 wire) against
torch.distributed gloo and Open MPI (mpi4py), in one run on one machine.

    python benchmarks/allreduce.py                    # 2 ranks, 4 KiB .. 256 MiB
    python benchmarks/allreduce.py --quick --out bench-out
    python benchmarks/allreduce.py --ranks 3 --peers dtrain,gloo
    python benchmarks/allreduce.py --hosts 2 --rate 10gbit   # test bed: one rank per namespace

Figures follow nccl-tests: algbw = bytes / time, busbw = algbw * 2(n-1)/n, where
bytes is the float32 tensor size (also for the fp16/bf16 wire variants, whose
result is float32). Each size reports the median over trials of back-to-back
calls, on random data. Writes allreduce.json, allreduce.md and allreduce.png.

With --hosts H the ranks run on H hosts of dtrain.testing.cluster (network namespaces
on one bridge, each host's egress limited to --rate), ranks spread evenly; the
"link" peer then measures what the link itself carries: both hosts streaming the
allreduce's per-rank byte count to each other at once over one TCP connection.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
QUICK_SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]


def fmt_size(b: int) -> str:
    return f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"


def trials_for(nbytes: int, quick: bool):
    """(calls per trial, trials): enough calls that a trial lasts tens of ms."""
    calls = max(2, min(2000, (256 << 20) // max(nbytes, 1) // (8 if quick else 2)))
    return calls, (3 if quick else 7)


def time_sizes(call, barrier, sizes, quick, make):
    """Median seconds per call for each size; `make(n)` builds the tensor."""
    return time_interleaved({"x": call}, barrier, sizes, quick, make)["x"]


def time_interleaved(calls, barrier, sizes, quick, make):
    """Median seconds per call for each variant and size. The variants' trials alternate
    (trial k of each before trial k+1 of any), so a slow spell of the machine hits all alike."""
    out = {name: {} for name in calls}
    for nbytes in sizes:
        t = make(nbytes // 4)
        reps, trials = trials_for(nbytes, quick)
        for call in calls.values():
            for _ in range(min(reps, 20)):  # warm-up: page faults, connections, caches
                call(t)
        samples = {name: [] for name in calls}
        for _ in range(trials):
            for name, call in calls.items():
                barrier()
                start = time.perf_counter()
                for _ in range(reps):
                    call(t)
                samples[name].append((time.perf_counter() - start) / reps)
        for name in calls:
            out[name][nbytes] = statistics.median(samples[name])
    return out


# ---------------------------------------------------------------- workers

# name: (compression, hierarchy). Plain "dtrain" is what a user gets (hierarchy "auto": hierarchical
# where each host holds 2+ ranks); the -flat variants force one ring through every rank.
DTRAIN_VARIANTS = {"dtrain": (None, "auto"), "dtrain-fp16": ("fp16", "auto"), "dtrain-bf16": ("bf16", "auto"),
                   "dtrain-flat": (None, "flat"), "dtrain-flat-fp16": ("fp16", "flat"),
                   "dtrain-hier": (None, "hierarchical"), "dtrain-hier-fp16": ("fp16", "hierarchical")}


def worker_dtrain(sizes, quick, variants):
    """All requested dtrain variants in one job, trials interleaved (same processes, same memory)."""
    import torch
    import dtrain
    torch.set_num_threads(1)
    dtrain.init(timeout=120)
    world = dtrain.comm.group.current().default._native

    def call(t, compression, hierarchy):
        world.hierarchy = hierarchy
        dtrain.allreduce(t, compression=compression)

    calls = {v: (lambda t, c=DTRAIN_VARIANTS[v]: call(t, *c)) for v in variants}
    res = time_interleaved(calls, dtrain.barrier, sizes, quick, lambda n: torch.randn(n))
    dtrain.shutdown()
    return res


def worker_gloo(sizes, quick, half):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from peers import init_gloo
    init_gloo()
    dtype = torch.float16 if half else torch.float32
    res = time_sizes(lambda t: dist.all_reduce(t), dist.barrier, sizes, quick,
                     lambda n: torch.randn(n).to(dtype))
    from peers import close_gloo
    close_gloo()
    return res


def worker_mpi(sizes, quick):
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    res = time_sizes(lambda t: comm.Allreduce(MPI.IN_PLACE, t, op=MPI.SUM), comm.Barrier, sizes, quick,
                     lambda n: np.random.default_rng(comm.rank).standard_normal(n, dtype=np.float32))
    return res if comm.rank == 0 else None


def worker_link(sizes, quick):
    """Both ranks stream `nbytes` to each other at once over one TCP connection: the
    time a 2-rank allreduce of `nbytes` would take if it moved bytes at the link's
    full duplex rate and did nothing else (each rank sends nbytes: half in the
    reduce-scatter, half in the allgather)."""
    import socket
    import threading

    import torch
    import dtrain
    dtrain.init(timeout=120)
    if dtrain.world_size() != 2:
        raise SystemExit("the link peer needs exactly 2 ranks")
    port = torch.zeros(1, dtype=torch.int64)
    if dtrain.rank() == 0:
        lst = socket.create_server(("", 0))
        port[0] = lst.getsockname()[1]
    dtrain.broadcast(port, root=0)
    if dtrain.rank() == 0:
        sock, _ = lst.accept()
        lst.close()
    else:
        sock = socket.create_connection((os.environ["DTRAIN_MASTER_ADDR"], int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out, inb = bytearray(64 << 20), bytearray(64 << 20)

    def recv_n(n):
        view = memoryview(inb)
        while n:
            k = sock.recv_into(view[:min(n, len(inb))])
            if k == 0:
                raise ConnectionError("link peer: the other rank closed the connection")
            n -= k

    def exchange(t):
        n = t  # bytes each way
        th = threading.Thread(target=recv_n, args=(n,))
        th.start()
        view = memoryview(out)
        while n:
            n -= sock.send(view[:min(n, len(out))])
        th.join()

    res = time_sizes(exchange, dtrain.barrier, sizes, quick, lambda n: n * 4)
    sock.close()
    dtrain.shutdown()
    return res


def _spawned(kind, sizes, quick):
    if isinstance(kind, tuple):
        return worker_dtrain(sizes, quick, kind)
    if kind == "gloo":
        return worker_gloo(sizes, quick, False)
    if kind == "gloo-fp16":
        return worker_gloo(sizes, quick, True)
    if kind == "link":
        return worker_link(sizes, quick)
    raise ValueError(kind)


# ---------------------------------------------------------------- driver


def find_mpirun():
    """(mpirun's path, None), or (None, why the MPI peer cannot run here)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None, "mpi4py is not installed (pip install 'dtrain[mpi]')"
    mpirun = shutil.which("mpirun")
    if not mpirun:
        return None, "mpirun is not on PATH (apt-get install openmpi-bin libopenmpi-dev)"
    return mpirun, None


def run_peer(kind, ranks, sizes, quick, log):
    """Seconds per call by size for one peer, or None with a reason."""
    if kind == "mpi":
        mpirun, why = find_mpirun()
        if why:
            return None, why
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dtrain-bench-mpi-{os.getpid()}.json")
        cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(ranks), "--bind-to", "core",
               sys.executable, __file__, "--mpi-worker", out, "--sizes", ",".join(map(str, sizes))]
        if quick:
            cmd.append("--quick")
        env = dict(os.environ, OMPI_MCA_btl_vader_single_copy_mechanism="none")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return None, f"mpirun failed: {proc.stderr.strip()[-300:]}"
        with open(out) as f:
            res = {int(k): v for k, v in json.load(f).items()}
        os.unlink(out)
        return res, None
    import dtrain.launch
    log(f"  {kind}: {ranks} ranks ...")
    res = dtrain.launch.run(_spawned, nprocs=ranks, args=(kind, sizes, quick), timeout=1800)
    return res[0], None


def run_on_testbed(cluster, kind, ranks, sizes, quick, log):
    """Seconds per call by size for one peer with its ranks spread over the test bed's hosts."""
    import tempfile
    if kind == "mpi":
        return mpi_on_testbed(cluster, ranks, sizes, quick, log)
    if kind == "link" and ranks != 2:
        return None, "the link peer measures one pair of hosts (2 ranks)"
    name = ",".join(kind) if isinstance(kind, tuple) else kind
    log(f"  {name}: {ranks} ranks on {len(cluster.hosts)} hosts ...")
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as tmp:
        out = os.path.join(tmp, "rank0.json")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, os.path.abspath(__file__), "--ns-worker", name, "--ns-out", out,
               "--sizes", ",".join(map(str, sizes))] + (["--quick"] if quick else [])
        done = cluster.launch(cmd, ranks, env=env, timeout=1800)
        failed = [f"rank {r} exited {rc}: {text.strip()[-400:]}" for r, (rc, text) in enumerate(done) if rc != 0]
        if failed:
            return None, "; ".join(failed)
        with open(out) as f:
            raw = json.load(f)
    if isinstance(kind, tuple):
        return {v: {int(k): t for k, t in raw[v].items()} for v in kind}, None
    return {int(k): t for k, t in raw.items()}, None


def mpi_on_testbed(cluster, ranks, sizes, quick, log):
    """Open MPI's MPI_Allreduce (through mpi4py) with mpirun on host 0 starting its daemons on the
    other hosts through the namespace agent, as `dtrain-run --mpi --remote-shell` does."""
    import tempfile
    mpirun, why = find_mpirun()
    if why:
        return None, why
    per_host = -(-ranks // len(cluster.hosts))
    log(f"  mpi: {ranks} ranks on {len(cluster.hosts)} hosts (Open MPI, btl tcp) ...")
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as tmp:
        out = os.path.join(tmp, "mpi.json")
        from dtrain.testing.cluster import remote_shell_agent
        agent = remote_shell_agent(tmp)
        ifname = cluster.hosts[0].ifname
        cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(ranks),
               "-H", ",".join(f"{h.netns}:{per_host}" for h in cluster.hosts),
               "--mca", "plm_rsh_agent", agent, "--mca", "btl_tcp_if_include", ifname,
               "--mca", "oob_tcp_if_include", ifname,
               # the test bed's hosts share this machine's cores (dtrain sees that and spins less)
               "--mca", "mpi_yield_when_idle", "1",
               sys.executable, os.path.abspath(__file__), "--mpi-worker", out, "--sizes", ",".join(map(str, sizes))]
        if quick:
            cmd.append("--quick")
        # Open MPI's shared-memory BTL (vader) crashes inside a network namespace: TCP within hosts too.
        env = dict(os.environ, OMPI_MCA_btl="tcp,self")
        proc = cluster.run(0, cmd, timeout=1800, env=env)
        if proc.returncode != 0:
            return None, f"mpirun failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
        with open(out) as f:
            return {int(k): v for k, v in json.load(f).items()}, None


def markdown(table, peers, ranks):
    head = "| size | " + " | ".join(f"{p} time | {p} busbw" for p in peers) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(peers))]
    for nbytes in sorted(table):
        cells = []
        for p in peers:
            r = table[nbytes].get(p)
            cells += ["n/a", "n/a"] if r is None else [f"{r['time_us']:.1f} us", f"{r['busbw_gbs']:.2f} GB/s"]
        lines.append(f"| {fmt_size(nbytes)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(table, ranks):
    lines = ["", "| size | dtrain/gloo busbw | dtrain/mpi busbw | fp16/fp32 time | bf16/fp32 time |",
             "|---|---|---|---|---|"]
    for nbytes in sorted(table):
        row = table[nbytes]

        def ratio(a, b, key="busbw_gbs"):
            return f"{row[a][key] / row[b][key]:.2f}x" if row.get(a) and row.get(b) else "n/a"

        lines.append(f"| {fmt_size(nbytes)} | {ratio('dtrain', 'gloo')} | {ratio('dtrain', 'mpi')} | "
                     f"{ratio('dtrain-fp16', 'dtrain', 'time_us')} | {ratio('dtrain-bf16', 'dtrain', 'time_us')} |")
    return "\n".join(lines)


def plot(table, peers, ranks, path, title=None):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = sorted(table)
    for p in peers:
        xs = [s for s in sizes if table[s].get(p)]
        if not xs:
            continue
        a.plot(xs, [table[s][p]["busbw_gbs"] for s in xs], marker="o", label=p)
        b.plot(xs, [table[s][p]["time_us"] for s in xs], marker="o", label=p)
    for ax, label in ((a, "busbw (GB/s)"), (b, "time per call (us)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tensor size (bytes, float32)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    b.set_yscale("log")
    fig.suptitle(title or f"allreduce, {ranks} ranks, one host")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--peers", default=ap_default_peers())
    ap.add_argument("--sizes", default=None, help="comma-separated byte counts")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and trials (CI smoke run)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--hosts", type=int, default=0,
                    help="run on the multi-host test bed with this many hosts (network namespaces; root)")
    ap.add_argument("--rate", default="10gbit", help="test bed: each host's link rate (tc units)")
    ap.add_argument("--delay", default=None, help="test bed: one-way link latency, e.g. 100us")
    ap.add_argument("--mpi-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ns-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ns-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (QUICK_SIZES if args.quick else SIZES)

    if args.ns_worker:
        kinds = args.ns_worker.split(",")
        res = _spawned(tuple(kinds) if kinds[0] in DTRAIN_VARIANTS else kinds[0], sizes, args.quick)
        if os.environ.get("DTRAIN_RANK") == "0":
            with open(args.ns_out, "w") as f:
                json.dump(res, f)
        return
    if args.hosts:
        return main_testbed(args, sizes)

    if args.mpi_worker:
        res = worker_mpi(sizes, args.quick)
        if res is not None:
            with open(args.mpi_worker, "w") as f:
                json.dump(res, f)
        return

    peers = [p for p in args.peers.split(",") if p]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"allreduce benchmark: {args.ranks} ranks, sizes {fmt_size(sizes[0])}..{fmt_size(sizes[-1])}")
    table = {s: {} for s in sizes}
    notes = {}
    results = {}
    dtrain_variants = tuple(p for p in peers if p in DTRAIN_VARIANTS)
    if dtrain_variants:
        log(f"running {', '.join(dtrain_variants)} (interleaved, one job)")
        import dtrain.launch
        results.update(dtrain.launch.run(_spawned, nprocs=args.ranks, args=(dtrain_variants, sizes, args.quick),
                                         timeout=1800)[0])
    for p in peers:
        if p in DTRAIN_VARIANTS:
            continue
        log(f"running {p}")
        res, why = run_peer(p, args.ranks, sizes, args.quick, log)
        if res is None:
            notes[p] = why
            log(f"  {p} skipped: {why}")
            continue
        results[p] = res
    for p in peers:
        if p not in results:
            continue
        for s, sec in results[p].items():
            algbw = s / sec / 1e9
            table[s][p] = {"time_us": sec * 1e6, "algbw_gbs": algbw,
                           "busbw_gbs": algbw * 2 * (args.ranks - 1) / args.ranks}
    os.makedirs(args.out, exist_ok=True)
    md = f"## allreduce, {args.ranks} ranks (median time per call; busbw per nccl-tests)\n\n"
    md += markdown(table, peers, args.ranks) + "\n" + ratios(table, args.ranks) + "\n"
    for p, why in notes.items():
        md += f"\n- {p}: not measured: {why}"
    print(md)
    with open(os.path.join(args.out, "allreduce.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "allreduce.json"), "w") as f:
        json.dump({"ranks": args.ranks, "results": {str(k): v for k, v in table.items()}, "notes": notes},
                  f, indent=1)
    if plot(table, peers, args.ranks, os.path.join(args.out, "allreduce.png")):
        log(f"wrote {args.out}/allreduce.png")


def main_testbed(args, sizes):
    from dtrain.testing import cluster as tb
    why = tb.available()
    if why:
        raise SystemExit(f"--hosts needs the multi-host test bed, which cannot run here: {why}")
    if args.ranks < args.hosts:
        args.ranks = args.hosts
    peers = [p for p in args.peers.split(",") if p]
    per_host = -(-args.ranks // args.hosts)
    if args.peers == ap_default_peers():
        peers = ["link", "dtrain", "dtrain-fp16", "dtrain-bf16", "gloo", "mpi"]
        if per_host > 1:  # the hierarchical path applies: measure the flat ring beside it
            peers = ["dtrain", "dtrain-flat", "dtrain-fp16", "dtrain-flat-fp16", "gloo", "mpi"]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    link = tb.rate_bytes_per_s(args.rate)
    log(f"allreduce benchmark on the test bed: {args.ranks} ranks on {args.hosts} hosts, "
        f"links {args.rate} ({link / 1e9:.3f} GB/s)" + (f", delay {args.delay}" if args.delay else ""))
    results, notes = {}, {}
    with tb.Cluster(args.hosts, rate=args.rate, delay=args.delay) as c:
        variants = tuple(p for p in peers if p in DTRAIN_VARIANTS)
        if variants:
            res, why = run_on_testbed(c, variants, args.ranks, sizes, args.quick, log)
            if res is None:
                raise SystemExit(f"dtrain failed on the test bed: {why}")
            results.update(res)
        for p in peers:
            if p in DTRAIN_VARIANTS:
                continue
            res, why = run_on_testbed(c, p, args.ranks, sizes, args.quick, log)
            if res is None:
                notes[p] = why
                log(f"  {p} skipped: {why}")
            else:
                results[p] = res
    table = {s: {} for s in sizes}
    for p in peers:
        for s, sec in results.get(p, {}).items():
            algbw = s / sec / 1e9
            table[s][p] = {"time_us": sec * 1e6, "algbw_gbs": algbw,
                           "busbw_gbs": algbw * 2 * (args.ranks - 1) / args.ranks}
    where = f"{args.ranks} ranks on {args.hosts} hosts, {args.rate} links" + (f", {args.delay} delay"
                                                                               if args.delay else "")
    md = f"## allreduce on the test bed: {where} (link = {link / 1e9:.3f} GB/s each way)\n\n"
    md += "dtrain = what a user gets (hierarchy 'auto'); dtrain-flat = one ring through every rank.\n\n"
    md += markdown(table, [p for p in peers if p in results], args.ranks) + "\n"
    # Targets: busbw >= 0.9x link at 64 MiB; fp16 >= 1.7x fp32 algbw; hierarchical >= 1.3x flat
    # (2+ ranks per host); never slower than gloo.
    cols = [("dtrain busbw / link rate", None), ("fp16/fp32 algbw", ("dtrain-fp16", "dtrain")),
            ("hierarchical/flat algbw", ("dtrain", "dtrain-flat")),
            ("hier-fp16/flat-fp16 algbw", ("dtrain-fp16", "dtrain-flat-fp16")),
            ("dtrain/gloo algbw", ("dtrain", "gloo")), ("dtrain/mpi algbw", ("dtrain", "mpi"))]
    cols = [(h, pair) for h, pair in cols if pair is None or all(p in results for p in pair)]
    md += "\n| size | " + " | ".join(h for h, _ in cols) + " |\n|" + "---|" * (1 + len(cols)) + "\n"
    for s in sizes:
        row = table[s]

        def r(pair):
            if pair is None:
                return f"{row['dtrain']['busbw_gbs'] * 1e9 / link:.2f}" if row.get("dtrain") else "n/a"
            a, b = pair
            return f"{row[a]['algbw_gbs'] / row[b]['algbw_gbs']:.2f}x" if row.get(a) and row.get(b) else "n/a"

        md += f"| {fmt_size(s)} | " + " | ".join(r(pair) for _, pair in cols) + " |\n"
    for p, why in notes.items():
        md += f"\n- {p}: not measured: {why}"
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = f"allreduce-testbed-{args.hosts}x{per_host}-{args.rate}"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"ranks": args.ranks, "hosts": args.hosts, "rate": args.rate, "delay": args.delay,
                   "link_bytes_per_s": link, "results": {str(k): v for k, v in table.items()},
                   "notes": notes}, f, indent=1)
    if plot(table, [p for p in peers if p in results], args.ranks, os.path.join(args.out, stem + ".png"),
            title=f"allreduce, {where}"):
        log(f"wrote {args.out}/{stem}.png")


def ap_default_peers():
    return "dtrain,dtrain-fp16,dtrain-bf16,gloo,gloo-fp16,mpi"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
