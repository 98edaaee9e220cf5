"""Training-step scaling: 1 process against 2 ranks, dtrain AllReduceStrategy against PyTorch DDP (gloo).

    python benchmarks/scaling.py                   # both models, 1 and 2 ranks
    python benchmarks/scaling.py --quick --out bench-out
    python benchmarks/scaling.py --part ps         # parameter server vs AllReduce with a straggler

Two models, weak scaling (the per-rank batch stays fixed):
  * compute-bound: a small ResNet on 32x32 synthetic images (about 0.08M parameters);
  * communication-heavy: a wide MLP of about 25M parameters on a small batch.
Every process runs one intra-op thread, so 2 ranks use the 2 cores of this machine.
Reports samples/s, the speed-up over DDP-gloo at the same rank count, and scaling
efficiency T(n) / (n * T(1)) against one plain-PyTorch process, next to n plain processes
that never communicate (what the shared machine alone costs). Writes scaling.md,
scaling.json and scaling.png into --out.
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
    "mlp-25M (communication-heavy)": ("mlp", 16, (1024,), 1024),
}
# no-comm: n plain-PyTorch processes at once that never talk, the ceiling this machine itself
# puts on weak scaling (shared memory bandwidth, caches, clocks) before any communication.
PEERS = ["torch-1proc", "no-comm", "dtrain", "dtrain-fp16", "ddp-gloo"]
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


def train_loop(model, opt, batch, shape, classes, steps, warmup, barrier):
    """Seconds per step (median of 5 windows) for `steps` steps after `warmup`."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch,) + shape, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    windows = []
    per = max(1, steps // 5)
    for _ in range(5):
        barrier()
        t0 = time.perf_counter()
        for _ in range(per):
            step()
        windows.append((time.perf_counter() - t0) / per)
    return statistics.median(windows)


def worker(peer, kind, batch, shape, classes, steps, warmup):
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if peer == "ddp-gloo":
        import torch.distributed as dist
        from peers import init_gloo
        init_gloo()
        model = torch.nn.parallel.DistributedDataParallel(model)
        sec = train_loop(model, opt, batch, shape, classes, steps, warmup, dist.barrier)
        # torch 2.13's DDP can deadlock freeing its Reducer (the gloo run loop waits for the GIL
        # under the lock the destructor needs); keep it alive: the launcher ends the process.
        _KEEP.append(model)
        return sec
    import dtrain
    strategy = dtrain.AllReduceStrategy(compression="fp16" if peer == "dtrain-fp16" else None)
    model, opt = strategy.prepare(model, opt)
    sec = train_loop(model, opt, batch, shape, classes, steps, warmup, strategy.barrier)
    dtrain.shutdown()
    return sec


def one_process(kind, batch, shape, classes, steps, warmup):
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return train_loop(model, opt, batch, shape, classes, steps, warmup, lambda: None)


def measure(peer, ranks, name, quick):
    kind, batch, shape, classes = MODELS[name]
    steps = (10 if quick else 40) if kind == "mlp" else (10 if quick else 30)
    warmup = 3
    if peer in ("torch-1proc", "no-comm"):
        if (ranks == 1) != (peer == "torch-1proc"):
            return None
        import dtrain.launch
        sec = max(dtrain.launch.run(one_process, nprocs=ranks, args=(kind, batch, shape, classes, steps, warmup),
                                    timeout=900))
    else:
        if ranks == 1:
            return None
        import dtrain.launch
        sec = max(dtrain.launch.run(worker, nprocs=ranks, args=(peer, kind, batch, shape, classes, steps, warmup),
                                    timeout=900))
    return {"sec_per_step": sec, "samples_per_s": batch * ranks / sec}


def params_of(kind):
    return sum(p.numel() for p in build(kind).parameters())


def plot(results, ranks_list, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        peers = [p for p in PEERS if p != "torch-1proc"]
        xs = range(len(peers))
        vals = [rows.get(f"{p}@{ranks_list[-1]}", {}).get("samples_per_s", 0) for p in peers]
        ax.bar(xs, vals, color=["#999", "#2a7", "#4b9", "#c66"][-len(peers):])
        base = rows.get("torch-1proc@1", {}).get("samples_per_s")
        if base:
            ax.axhline(base * ranks_list[-1], ls="--", c="k", lw=1, label=f"ideal {ranks_list[-1]}x one process")
            ax.axhline(base, ls=":", c="gray", lw=1, label="one process")
        ax.set_xticks(list(xs), peers)
        ax.set_ylabel("samples/s")
        ax.set_title(f"{name}, {ranks_list[-1]} ranks")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="repeat every measurement, report the median")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model names or prefixes (resnet, mlp)")
    ap.add_argument("--part", choices=["all", "ddp", "ps"], default="all",
                    help="ddp: strategies against DDP; ps: the parameter server against AllReduce with a straggler "
                         "(benchmarks/ps_straggler.py; writes scaling-ps.*)")
    args = ap.parse_args(argv)
    if args.part in ("all", "ps"):
        import ps_straggler
        lines, data = ps_straggler.run(args.quick, 1 if args.quick else args.rounds,
                                       progress=lambda s: print(f"scaling: {s}", file=sys.stderr, flush=True))
        ps_straggler.write(lines, data, args.out)
        if args.part == "ps":
            return
    asked = [m.strip() for m in args.models.split(",") if m.strip()]
    names = [k for k in MODELS if any(k == m or k.startswith(m) for m in asked)]  # "mlp" picks "mlp-25M (...)"
    unknown = [m for m in asked if not any(k.startswith(m) for k in MODELS)]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(map(repr, unknown))}: choose from {', '.join(map(repr, MODELS))} "
                 "(a prefix such as 'mlp' is enough)")
    ranks_list = [1, args.ranks]
    # Peers alternate within each round, and rounds repeat, so a slow spell of a shared
    # machine falls on every peer alike; each peer reports its median round.
    rounds = 1 if args.quick else args.rounds
    jobs = [(n, p, r, k) for n in names for k in range(rounds) for r in ranks_list for p in PEERS
            if (p == "torch-1proc") == (r == 1)]
    try:
        from tqdm import tqdm
        bar = tqdm(jobs, desc="scaling", ncols=90, file=sys.stderr)
    except ImportError:
        bar = jobs
    results = {n: {} for n in names}
    runs = {}
    for name, peer, ranks, rnd in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{name.split()[0]} {peer} x{ranks} round {rnd + 1}")
        r = measure(peer, ranks, name, args.quick)
        if r is not None:
            runs.setdefault((name, f"{peer}@{ranks}"), []).append(r)
    for (name, key), rs in runs.items():  # the median round, per peer
        results[name][key] = sorted(rs, key=lambda r: r["sec_per_step"])[len(rs) // 2]
    cores = os.cpu_count()
    lines = [f"## Training-step scaling, 1 vs {args.ranks} ranks ({cores} cores; one intra-op thread per process)",
             "", "Weak scaling: the per-rank batch is fixed; efficiency = samples/s(n) / (n * samples/s of one "
             "plain-PyTorch process); no-comm is that many plain processes at once that never communicate, "
             "the most this machine allows.", ""]
    lines += ["| model | params | peer | ranks | ms/step | samples/s | vs DDP-gloo | efficiency |",
              "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in names:
        rows = results[name]
        base = rows.get("torch-1proc@1", {}).get("samples_per_s")
        gloo = rows.get(f"ddp-gloo@{args.ranks}", {}).get("samples_per_s")
        nparams = params_of(MODELS[name][0])
        for key, r in rows.items():
            peer, ranks = key.split("@")
            ranks = int(ranks)
            eff = r["samples_per_s"] / (ranks * base) if base else None
            vs = r["samples_per_s"] / gloo if gloo and ranks > 1 and peer != "no-comm" else None
            r.update({"efficiency": eff, "vs_ddp_gloo": vs})
            lines.append(f"| {name} | {nparams / 1e6:.2f}M | {peer} | {ranks} | {r['sec_per_step'] * 1e3:.1f} | "
                         f"{r['samples_per_s']:.0f} | {f'{vs:.2f}x' if vs else '-'} | "
                         f"{f'{eff:.2f}' if eff else '-'} |")
        summary[name] = rows
    if ranks_list[-1] > (cores or 1):
        lines.append(f"\nNote: {ranks_list[-1]} ranks outnumber the {cores} cores; expect poor efficiency.")
    md = "\n".join(lines)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump({"ranks": ranks_list, "cores": cores, "results": summary}, f, indent=1)
    if plot(results, ranks_list, os.path.join(args.out, "scaling.png")):
        print(f"wrote {args.out}/scaling.png", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    sys.path.insert(0, HERE)
    main()
