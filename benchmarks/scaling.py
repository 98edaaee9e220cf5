"""Training-step scaling: every dtrain strategy against PyTorch DDP (gloo), on 1, 2 and 4 ranks
and on the two-host test bed.

    dtrain-bench scaling                       # everything, 3 rounds each (medians)
    dtrain-bench scaling --quick --out bench-out
    dtrain-bench scaling --part local --ranks 1,2 --models mlp
    dtrain-bench scaling --part ps             # parameter server vs AllReduce with a straggler

Two models, weak scaling (the per-rank batch stays fixed):
  * compute-bound: a small ResNet on 32x32 synthetic images (about 0.08M parameters);
  * communication-bound: a wide MLP of about 25M parameters on a small batch.
Peers: one plain-PyTorch process (T(1)); n plain processes that never communicate (no-comm,
the ceiling this machine puts on n ranks before any communication); AllReduceStrategy with
fp32, fp16 and bf16 wire; ParameterServerStrategy (1 server + n-1 asynchronous workers);
PipelineStrategy (n stages, 2n micro-batches, 1F1B); DDP over gloo. Every process runs one
intra-op thread. Test bed: 2 hosts (network namespaces on this machine) joined by links
shaped to 10 and 1 Gbit/s, one rank each.

Reports samples/s, the speed-up over DDP-gloo at the same placement, efficiency
T(n) / (n * T(1)), the step split into compute / communication / exposed communication,
and bytes each rank sends per step. Writes scaling.md, scaling.json, scaling.png and
scaling-testbed.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (builder, per-rank batch, input shape, classes)
MODELS = {
    "resnet (compute-bound)": ("resnet", 32, (3, 32, 32), 10),
    "mlp-25M (communication-bound)": ("mlp", 16, (1024,), 1024),
}
PEERS = {  # name -> what it is
    "torch-1proc": "one plain PyTorch process: T(1)",
    "no-comm": "n plain processes that never communicate: what the machine allows",
    "allreduce": "dtrain AllReduceStrategy, fp32 wire",
    "allreduce-fp16": "dtrain AllReduceStrategy(compression='fp16')",
    "allreduce-bf16": "dtrain AllReduceStrategy(compression='bf16')",
    "ps": "dtrain ParameterServerStrategy, 1 server + n-1 async workers",
    "pipeline": "dtrain PipelineStrategy, n stages, 2n micro-batches, 1F1B",
    "ddp-gloo": "torch DistributedDataParallel over gloo",
}
TESTBED_PEERS = ["no-comm", "allreduce", "allreduce-fp16", "allreduce-bf16", "ddp-gloo"]
LINKS = ["10gbit", "1gbit"]
_KEEP = []


def build(kind):
    import torch.nn as nn
    if kind == "mlp":
        return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                             nn.Linear(4096, 1024))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = self.b2(self.c2(self.b1(self.c1(x)).relu()))
            return (y + self.skip(x)).relu()

    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def params_of(kind):
    return sum(p.numel() for p in build(kind).parameters())


# ---------------------------------------------------------------- one rank


def tx_bytes():
    """Bytes this host's test-bed interface has sent (None off the test bed)."""
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    path = f"/sys/class/net/{iface}/statistics/tx_bytes"
    if not iface or not os.path.exists(path):
        return None
    with open(path) as f:
        return int(f.read())


def timed(step, steps, warmup, barrier, probe=lambda: None):
    """Seconds per step (median of 5 windows) after `warmup` steps, and what `probe()` returned
    before and after the windows."""
    for _ in range(warmup):
        step()
    windows = []
    per = max(1, steps // 5)
    barrier()
    before = probe()
    for _ in range(5):
        barrier()
        t0 = time.perf_counter()
        for _ in range(per):
            step()
        windows.append((time.perf_counter() - t0) / per)
    return statistics.median(windows), before, probe(), 5 * per


def worker(peer, model_name, steps, warmup):
    """One rank of `peer` training `model_name`; returns this rank's measurements (None on a
    parameter server, which only serves)."""
    import torch
    import torch.nn.functional as F

    from dtrain import memory
    # Every peer, plain PyTorch and DDP included, runs with the allocator settings dtrain.init()
    # applies (DTRAIN_MALLOC=0 turns them off for all): the ratios measure communication.
    memory.keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kind, batch, shape, classes = MODELS[model_name]
    model = build(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out = {}
    if peer in ("torch-1proc", "no-comm"):
        ranks, barrier = 1, lambda: None
    elif peer == "ddp-gloo":
        from peers import init_gloo
        dist = init_gloo()
        ranks, barrier = dist.get_world_size(), dist.barrier
        model = torch.nn.parallel.DistributedDataParallel(model)
        # torch 2.13's DDP can deadlock freeing its Reducer (the gloo run loop waits for the GIL
        # under the lock the destructor needs); keep it alive: the launcher ends the process.
        _KEEP.append(model)
    else:
        import dtrain
        dtrain.init(timeout=600)
        ranks = dtrain.world_size()
        if peer == "ps":
            strategy = dtrain.ParameterServerStrategy(num_servers=1)
        elif peer == "pipeline":
            strategy = dtrain.PipelineStrategy(micro_batches=2 * ranks)
        else:
            wire = peer.split("-")[1] if "-" in peer else None
            strategy = dtrain.AllReduceStrategy(compression=wire)
        model, opt = strategy.prepare(model, opt)
        if peer == "ps" and dtrain.rank() == 0:
            dtrain.shutdown()  # the server served until every worker finished
            return None
        barrier = (lambda: None) if peer == "ps" else strategy.barrier
    rows = batch * ranks if peer == "pipeline" else batch  # a pipeline's batch is the whole job's
    g = torch.Generator().manual_seed(0)
    x = torch.randn((rows,) + shape, generator=g)
    y = torch.randint(0, classes, (rows,), generator=g)
    compute = [0.0]

    if peer == "pipeline":
        def step():
            opt.zero_grad(set_to_none=True)
            strategy.train_step((x, y), F.cross_entropy)
            opt.step()
            compute[0] += strategy.stats()["compute_s"]
    else:
        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def probe():
        st = strategy.stats() if peer.startswith("allreduce") else {}
        return {"tx": tx_bytes(), "stats": dict(st), "compute": compute[0]}

    sec, before, after, n = timed(step, steps, warmup, barrier, probe)
    out["sec_per_step"] = sec
    if after["tx"] is not None:
        out["tx_bytes_per_step"] = (after["tx"] - before["tx"]) / n
    if after["stats"]:
        for k in ("comm_s", "blocked_s", "pack_s", "unpack_s", "wire_bytes"):
            out[k] = (after["stats"][k] - before["stats"][k]) / n
    if peer == "pipeline":
        out["compute_s"] = (after["compute"] - before["compute"]) / n
    if peer not in ("torch-1proc", "no-comm", "ddp-gloo"):
        import dtrain
        dtrain.shutdown()
    return out


def ns_worker(arg):
    """A test-bed rank: runs worker() and writes its result to <out>/rank<R>.json."""
    spec = json.loads(arg)
    res = worker(spec["peer"], spec["model"], spec["steps"], spec["warmup"])
    with open(os.path.join(spec["out"], f"rank{os.environ['DTRAIN_RANK']}.json"), "w") as f:
        json.dump(res, f)
    # The result is written; skip interpreter teardown, where torch 2.13's DDP/gloo can abort
    # ("terminate called without an active exception") as the local launcher's kill never lets it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- one job


def steps_for(model_name, quick, link=None):
    kind = MODELS[model_name][0]
    if link == "1gbit" and kind == "mlp":
        return 5 if quick else 10  # about 0.8 s a step in fp32
    # ResNet steps take 25-35 ms and varied by up to ~3 ms step to step here: 120 of them (about
    # 4 s) average that out in each of the 5 windows, where 30 left 6 steps a window.
    return (10 if quick else 40) if kind == "mlp" else (10 if quick else 120)


def run_local(peer, ranks, model_name, quick):
    import dtrain.launch
    steps = steps_for(model_name, quick)
    return dtrain.launch.run(worker, nprocs=ranks, args=(peer, model_name, steps, 3), timeout=900)


def run_testbed(cluster, peer, model_name, quick, link):
    import tempfile
    steps = steps_for(model_name, quick, link)
    with tempfile.TemporaryDirectory(prefix="dtrain-scaling-") as tmp:
        spec = json.dumps({"peer": peer, "model": model_name, "steps": steps, "warmup": 2, "out": tmp})
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE,
                                                           os.environ.get("PYTHONPATH", "")]))
        done = cluster.launch([sys.executable, os.path.abspath(__file__), "--ns-worker", spec], 2, env=env,
                              timeout=900)
        failed = [f"rank {r} exited {rc}: {text.strip()[-600:]}" for r, (rc, text) in enumerate(done) if rc]
        if failed:
            raise RuntimeError(f"{peer} on the test bed failed: " + "; ".join(failed))
        res = []
        for r in range(2):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                res.append(json.load(f))
    return res


def combine(peer, ranks, model_name, per_rank):
    """One job's figures from its ranks' measurements."""
    batch = MODELS[model_name][1]
    rs = [r for r in per_rank if r is not None]  # a parameter server reports nothing
    sec = max(r["sec_per_step"] for r in rs)
    trainers = ranks - 1 if peer == "ps" else ranks
    row = {"sec_per_step": sec, "samples_per_s": batch * trainers / sec, "trainers": trainers}
    mean = lambda k: statistics.fmean(r[k] for r in rs) if all(k in r for r in rs) else None  # noqa: E731
    for k in ("comm_s", "blocked_s", "pack_s", "unpack_s", "wire_bytes", "tx_bytes_per_step"):
        if mean(k) is not None:
            row[k] = mean(k)
    if peer == "pipeline":
        row["compute_s"] = max(r["compute_s"] for r in rs)  # the busiest stage
    return row


# ---------------------------------------------------------------- the report


def split(row, peer, nocomm_sec, n_params, ranks):
    """(compute s, communication s or None, exposed s, how exposed was measured, bytes sent per rank
    per step or None, where the bytes come from)."""
    sec = row["sec_per_step"]
    if "blocked_s" in row:  # dtrain AllReduce measures its own waits
        exposed, how = row["blocked_s"], "measured"
        comm = row["comm_s"]
    elif peer == "pipeline":
        exposed, how, comm = max(sec - row["compute_s"], 0.0), "idle (bubble + transfers)", None
    elif nocomm_sec:
        exposed, how, comm = max(sec - nocomm_sec, 0.0), "vs no-comm", None
    else:
        exposed, how, comm = None, "-", None
    compute = sec - exposed if exposed is not None else None
    if "tx_bytes_per_step" in row:
        sent, src = row["tx_bytes_per_step"], "link counter"
    elif "wire_bytes" in row:
        sent, src = row["wire_bytes"], "ring 2(n-1)/n"
    elif peer == "ddp-gloo" and ranks > 1:
        sent, src = n_params * 4 * 2 * (ranks - 1) / ranks, "ring 2(n-1)/n"
    elif peer == "ps":
        sent, src = n_params * 4, "push (worker)"
    else:
        sent, src = None, "-"
    return compute, comm, exposed, how, sent, src


def table(results, names, place_rows, cores):
    """Markdown rows for one placement."""
    lines = ["| model | peer | placement | ranks | ms/step | samples/s | vs DDP-gloo | efficiency | compute ms | comm ms | "
             "exposed ms (share) | exposed from | MB sent/rank/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        rows = results[name]
        base = rows.get("torch-1proc@local@1", {}).get("samples_per_s")
        nparams = params_of(MODELS[name][0])
        for key in place_rows(rows):
            r = rows[key]
            peer, place, ranks = key.split("@")
            ranks = int(ranks)
            gloo = rows.get(f"ddp-gloo@{place}@{ranks}", {}).get("samples_per_s")
            # compute at the same placement: a test-bed host's no-comm (namespaces cost a little)
            nocomm = (rows.get(f"no-comm@{place}@{ranks}") or rows.get(f"no-comm@local@{ranks}", {})).get("sec_per_step")
            eff = r["samples_per_s"] / (ranks * base) if base else None
            vs = r["samples_per_s"] / gloo if gloo and ranks > 1 and peer != "no-comm" else None
            compute, comm, exposed, how, sent, src = split(r, peer, nocomm, nparams, ranks)
            r.update({"efficiency": eff, "vs_ddp_gloo": vs, "compute_s": compute, "exposed_s": exposed,
                      "exposed_from": how, "bytes_sent_per_step": sent, "bytes_from": src})
            if peer in ("torch-1proc", "no-comm"):
                compute, exposed, how = r["sec_per_step"], None, "-"
            ms = lambda v: f"{v * 1e3:.1f}" if v is not None else "-"  # noqa: E731
            share = f"{ms(exposed)} ({exposed / r['sec_per_step']:.0%})" if exposed is not None else "-"
            lines.append(
                f"| {name.split()[0]} | {peer} | {'one host' if place == 'local' else f'2 hosts, {place}'} | {ranks}{'*' if ranks > cores and place == 'local' else ''} | "
                f"{ms(r['sec_per_step'])} | {r['samples_per_s']:.0f} | {f'{vs:.2f}x' if vs else '-'} | "
                f"{f'{eff:.2f}' if eff else '-'} | {ms(compute)} | {ms(comm)} | {share} | {how} | "
                f"{f'{sent / 1e6:.1f} ({src})' if sent is not None else '-'} |")
    return lines


def targets(results, names):
    """The issue's targets, checked against this run."""
    out = []

    def ratio(name, peer, place, ranks):
        r = results.get(name, {}).get(f"{peer}@{place}@{ranks}", {})
        return r.get("vs_ddp_gloo")

    comm = next((n for n in names if MODELS[n][0] == "mlp"), None)
    compute = next((n for n in names if MODELS[n][0] == "resnet"), None)
    if comm:
        for peer, goal, place in (("allreduce", 1.2, "local"), ("allreduce-fp16", 1.5, "local"),
                                  ("allreduce-fp16", 1.5, "1gbit")):
            v = ratio(comm, peer, place, 2)
            if v is not None:
                where = "one host" if place == "local" else f"test bed, {place} link"
                out.append(f"- {peer} vs DDP-gloo, communication-bound model, 2 ranks ({where}): **{v:.2f}x** "
                           f"(target {goal}x: {'met' if v >= goal else 'missed'})")
    if compute:
        r = results[compute].get("allreduce@local@2")
        if r and r.get("exposed_s") is not None:
            share = r["exposed_s"] / r["sec_per_step"]
            out.append(f"- exposed communication, compute-bound model, 2 ranks: **{share:.0%}** of the step "
                       f"(target at most 30%: {'met' if share <= 0.30 else 'missed'})")
        ceiling = results[compute].get("no-comm@local@2", {}).get("efficiency")
        if r and r.get("efficiency") is not None:
            eff = r["efficiency"]
            line = (f"- scaling efficiency, compute-bound model, 2 ranks (one host): **{eff:.2f}** "
                    f"(target 0.9: {'met' if eff >= 0.9 else 'missed'})")
            if ceiling:
                # Two processes that never communicate bound what any strategy can reach here.
                line += (f"; this machine's ceiling in the same run (no-comm) {ceiling:.2f}, of which "
                         f"dtrain reaches {eff / ceiling:.0%}")
            out.append(line)
    return out


def plot(results, names, ranks_list, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    peers = [p for p in PEERS if p != "torch-1proc"]
    colors = dict(zip(peers, ["#999", "#1b7837", "#5aae61", "#a6dba0", "#762a83", "#2166ac", "#d6604d"]))
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 8), squeeze=False)
    for col, name in enumerate(names):
        rows = results[name]
        base = rows.get("torch-1proc@local@1", {}).get("samples_per_s")
        for peer in peers:
            pts = [(n, rows[f"{peer}@local@{n}"]) for n in ranks_list if f"{peer}@local@{n}" in rows]
            if base:
                pts = [(1, rows["torch-1proc@local@1"])] + [p for p in pts if p[0] != 1]
            if len(pts) < 2:
                continue
            xs = [n for n, _ in pts]
            axes[0][col].plot(xs, [r["samples_per_s"] for _, r in pts], "o-", c=colors[peer], label=peer)
            if base:
                axes[1][col].plot(xs, [r["samples_per_s"] / (n * base) for n, r in pts], "o-", c=colors[peer],
                                  label=peer)
        if base:
            axes[0][col].plot(ranks_list, [base * n for n in ranks_list], "k--", lw=1, label="ideal")
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("samples/s")
        axes[1][col].set_ylabel("efficiency T(n) / (n T(1))")
        axes[1][col].set_ylim(0, 1.1)
        for ax in axes[:, col]:
            ax.set_xlabel(f"ranks ({os.cpu_count()} cores)")
            ax.set_xticks(ranks_list)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "scaling.png")
    fig.savefig(path, dpi=110)
    written.append(path)
    plt.close(fig)
    links = [l for l in LINKS if any(f"{p}@{l}@2" in results[n] for n in names for p in TESTBED_PEERS)]
    if links:
        fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names):
            rows = results[name]
            width = 0.8 / len(TESTBED_PEERS)
            for i, peer in enumerate(TESTBED_PEERS):
                vals = [rows.get(f"{peer}@{l}@2", {}).get("samples_per_s", 0) for l in links]
                ax.bar([j + i * width for j in range(len(links))], vals, width, label=peer, color=colors[peer])
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(links))], [f"2 hosts, {l}" for l in links])
            ax.set_ylabel("samples/s")
            ax.set_title(name)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "scaling-testbed.png")
        fig.savefig(path, dpi=110)
        written.append(path)
        plt.close(fig)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round, fewer steps (under 10 minutes here)")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts on this host")
    ap.add_argument("--rounds", type=int, default=3, help="repeat every measurement, report the median")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model names or prefixes (resnet, mlp)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers: " + ", ".join(PEERS))
    ap.add_argument("--links", default=",".join(LINKS), help="test-bed link rates (tc units)")
    ap.add_argument("--part", choices=["all", "local", "testbed", "ps"], default="all",
                    help="local: this host only; testbed: the 2-host test bed only; ps: the parameter server "
                         "against AllReduce with a straggler (benchmarks/ps_straggler.py; writes scaling-ps.*)")
    ap.add_argument("--ns-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ns_worker:
        return ns_worker(args.ns_worker)
    if args.part == "ps":
        import ps_straggler
        lines, data = ps_straggler.run(args.quick, 1 if args.quick else args.rounds,
                                       progress=lambda s: print(f"scaling: {s}", file=sys.stderr, flush=True))
        ps_straggler.write(lines, data, args.out)
        return
    asked = [m.strip() for m in args.models.split(",") if m.strip()]
    names = [k for k in MODELS if any(k == m or k.startswith(m) for m in asked)]  # "mlp" picks "mlp-25M (...)"
    unknown = [m for m in asked if not any(k.startswith(m) for k in MODELS)]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(map(repr, unknown))}: choose from {', '.join(map(repr, MODELS))} "
                 "(a prefix such as 'mlp' is enough)")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        ap.error(f"unknown peer(s) {', '.join(map(repr, bad))}: choose from {', '.join(PEERS)}")
    try:
        ranks_list = sorted({int(r) for r in args.ranks.split(",") if r.strip()} | {1})
    except ValueError:
        ap.error(f"--ranks takes comma-separated counts such as 1,2,4, got {args.ranks!r}")
    links = [l.strip() for l in args.links.split(",") if l.strip()]
    cores = os.cpu_count() or 1
    rounds = 1 if args.quick else args.rounds
    notes = []

    # Every job: (model, peer, place, ranks). Peers alternate within a round and rounds repeat,
    # so a slow spell of the shared machine falls on every peer alike; each reports its median.
    local_jobs, bed_jobs = [], []
    if args.part in ("all", "local"):
        for n in ranks_list:
            for p in peers:
                if (p == "torch-1proc") == (n == 1):
                    local_jobs.append((p, "local", n))
    else:  # efficiency and the compute split need T(1) and no-comm at 2 ranks
        local_jobs = [("torch-1proc", "local", 1), ("no-comm", "local", 2)]
    if args.part in ("all", "testbed"):
        from dtrain.testing import cluster as tb
        why = tb.available()
        if why:
            notes.append(f"test bed not measured: {why}")
        else:
            bed_jobs = [(p, link, 2) for link in links for p in TESTBED_PEERS if p in peers]
    jobs = [(name, k, job) for name in names for k in range(rounds) for job in local_jobs]
    jobs += [(name, k, job) for k in range(rounds) for job in bed_jobs for name in names]
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="scaling", ncols=100, file=sys.stderr)
    except ImportError:
        bar = None
    t_start = time.monotonic()
    runs = {}

    def record(name, peer, place, n, per_rank):
        runs.setdefault((name, f"{peer}@{place}@{n}"), []).append(combine(peer, n, name, per_rank))

    def tick(name, peer, place, n, k):
        if bar is not None:
            bar.set_postfix_str(f"{name.split()[0]} {peer} x{n} {place} r{k + 1}")
            bar.update(1)

    for name, k, (peer, place, n) in [j for j in jobs if j[2][1] == "local"]:
        tick(name, peer, place, n, k)
        record(name, peer, place, n, run_local(peer, n, name, args.quick))
    bed = [j for j in jobs if j[2][1] != "local"]
    for link in links:
        mine = [j for j in bed if j[2][1] == link]
        if not mine:
            continue
        with tb.Cluster(2, rate=link) as c:
            for name, k, (peer, place, n) in mine:
                tick(name, peer, place, n, k)
                try:
                    record(name, peer, place, n, run_testbed(c, peer, name, args.quick, link))
                except RuntimeError as e:
                    notes.append(str(e)[:600])
    if bar is not None:
        bar.close()
    results = {n: {} for n in names}
    for (name, key), rs in runs.items():  # the median round, per peer
        results[name][key] = sorted(rs, key=lambda r: r["sec_per_step"])[len(rs) // 2]
    elapsed = time.monotonic() - t_start
    from dtrain import memory

    lines = [f"## Training-step scaling ({cores} cores; one intra-op thread per process; "
             f"{'quick, 1 round' if args.quick else f'median of {rounds} rounds'}; {elapsed / 60:.1f} min)", "",
             "Weak scaling: the per-rank batch is fixed. efficiency = samples/s(n) / (n * samples/s of one plain "
             "PyTorch process). compute + exposed = the step; comm is the time collectives were in flight on "
             "dtrain's progress thread (overlapped or not); exposed is measured by dtrain itself (backward's end "
             "blocked on reductions), by the pipeline's idle time, or for the others as the step minus no-comm's at "
             "the same rank count and placement. Bytes: the test bed's interface counter where there is one, else the "
             "algorithm's count. Every peer, plain PyTorch and DDP included, runs with the glibc allocator settings "
             f"dtrain.init() applies (dtrain.memory; {'on' if memory.keep_freed_memory() else 'off here'}), so the "
             "ratios measure communication, not the allocator. On one host dtrain's ranks share memory and send "
             "float32 whatever compression asks (converting costs more than it saves there), so fp16/bf16 equal fp32 locally.", ""]
    lines += ["### One host", ""] + table(results, names, lambda rows: [k for k in rows if k.split("@")[1] == "local"],
                                           cores)
    if ranks_list[-1] > cores:
        lines.append(f"\n\\* {ranks_list[-1]} ranks outnumber the {cores} cores: the ranks time-share them, so "
                     "efficiency there measures the machine, not the strategy (see no-comm).")
    bed_keys = lambda rows: [k for k in rows if k.split("@")[1] != "local"]  # noqa: E731
    if any(bed_keys(results[n]) for n in names):
        lines += ["", "### Test bed: 2 hosts (network namespaces), one rank each, links shaped by tc tbf", ""]
        lines += table(results, names, bed_keys, cores)
    lines += ["", "### Targets", ""] + (targets(results, names) or ["- (not measured in this run)"])
    if notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    md = "\n".join(lines)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump({"ranks": ranks_list, "links": links, "cores": cores, "quick": args.quick, "rounds": rounds,
                   "seconds": elapsed, "peers": {p: PEERS[p] for p in peers},
                   "params": {n: params_of(MODELS[n][0]) for n in names},
                   "results": results, "notes": notes}, f, indent=1)
    for path in plot(results, names, ranks_list, args.out):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    sys.path.insert(0, HERE)
    main()
