"""ParameterServerStrategy against AllReduceStrategy with a straggler, and a server's apply rate.

Part of benchmarks/scaling.py (`python benchmarks/scaling.py --part ps`), runnable alone:

    python benchmarks/ps_straggler.py [--quick] [--out DIR]

1. Digits (examples/train_digits.py's CNN and split, Adam lr 3e-3, global batch 64):
   AllReduceStrategy on 2 ranks against 1 parameter server + 2 fully asynchronous workers.
   The last trainer is made 3x slower: after each step it sleeps twice the compute of one
   plain step (measured before training, without communication).
   Both train the same budget of global samples; reported: samples/s, time and samples to
   95% test accuracy, the final accuracy, and updates/s (optimizer steps applied).
2. A server's apply rate: one real server (C++ threads, one core's kernels) and one worker
   in this process push float32 gradients of a 16M-parameter shard over loopback TCP;
   reported: GB/s of gradient applied by the fused kernel alone, and end to end (receive +
   apply + send the parameters back).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TARGET = 0.95


def digits_rank(mode, slow_factor, budget, stop_dir):
    """One rank of the digits race. Returns what the first trainer measured (None elsewhere)."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    import torch
    import torch.nn.functional as F
    import dtrain
    from train_digits import DigitsNet, accuracy, load_digits_split
    torch.set_num_threads(1)
    dtrain.init()
    strategy = dtrain.ParameterServerStrategy(1) if mode == "ps" else dtrain.AllReduceStrategy()
    torch.manual_seed(0)
    train, test = load_digits_split(0)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # The straggler's sleep: a fixed multiple of one plain step's compute (batch 32, no communication),
    # the same for both strategies.
    probe = DigitsNet()
    x, y = train.tensors[0][:32], train.tensors[1][:32]
    times = []
    for _ in range(30):
        c0 = time.perf_counter()
        F.cross_entropy(probe(x), y).backward()
        times.append(time.perf_counter() - c0)
    pause = (slow_factor - 1) * statistics.median(times[10:])
    model, opt = strategy.prepare(model, opt)
    if getattr(strategy, "is_server", False):
        stats = strategy.stats()["servers"][0]
        dtrain.shutdown()
        return {"server": stats}
    trainers = strategy.num_workers if mode == "ps" else strategy.world_size
    me = strategy.worker_index if mode == "ps" else strategy.rank
    first, slow = me == 0, me == trainers - 1
    loader = strategy.distribute(train, batch_size=64 // trainers, seed=0)
    stop = os.path.join(stop_dir, "stop")
    mine = 0  # this trainer's samples
    train_s, reached, steps, acc = 0.0, None, 0, 0.0
    epoch = 0
    done = False
    while not done:
        loader.sampler.set_epoch(epoch)
        epoch += 1
        t0 = time.perf_counter()
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if slow:
                time.sleep(pause)
            mine += len(x)
            steps += 1
            if mode == "ps" and not first and os.path.exists(stop):
                done = True
                break
        train_s += time.perf_counter() - t0
        if done:
            break
        # every trainer of the synchronous strategy holds the same model and decides alike
        if mode == "ps":
            strategy.synchronize()
            pushes = strategy.stats()["servers"][0]["pushes"]
            total = pushes * (64 // trainers)
        else:
            total = mine * trainers
        if first or mode != "ps":
            acc = accuracy(model, test)
            if reached is None and acc >= TARGET:
                reached = {"seconds": train_s, "samples": total, "accuracy": acc}
            if total >= budget:
                done = True
                if mode == "ps":
                    open(stop, "w").close()
    result = None
    if first:
        result = {"seconds": train_s, "samples": total, "steps": steps, "accuracy": acc, "reached": reached}
        if mode == "ps":
            result["server"] = strategy.stats()["servers"][0]
    dtrain.shutdown()
    return result


def digits_race(mode, slow_factor, budget):
    import dtrain.launch
    with tempfile.TemporaryDirectory() as stop_dir:
        out = dtrain.launch.run(digits_rank, nprocs=3 if mode == "ps" else 2,
                                args=(mode, slow_factor, budget, stop_dir), timeout=900)
    r = next(o for o in out if o is not None and "seconds" in o)
    r["samples_per_s"] = r["samples"] / r["seconds"]
    r["updates_per_s"] = (r["server"]["pushes"] if mode == "ps" else r["steps"]) / r["seconds"]
    if r["reached"]:
        r["reached"]["samples_per_s"] = r["reached"]["samples"] / r["reached"]["seconds"]
    return r


def apply_rate(elements, pushes, optimizer="sgd"):
    """GB/s of float32 gradient one server applies: kernel only, and end to end over loopback."""
    import torch
    from dtrain import _C
    params = torch.zeros(elements)
    spec = dict(begin=0, end=elements, group=0, lr=1e-3, weight_decay=0.0, momentum=0.9)
    server = _C.ps.Server(token="bench", optimizer=optimizer, num_workers=1, num_groups=1, first_worker_rank=1,
                          rank=0, staleness=-1, timeout=60.0, layout_hash=1, bind_host="127.0.0.1", groups=[spec],
                          params=params.data_ptr(), count=elements)
    try:
        client = _C.ps.Client(token="bench", worker=0, rank=1, hosts=["127.0.0.1"], ports=[server.port],
                              server_ranks=[0], bounds=[0, elements], layout_hash=1, num_groups=1, timeout=60.0)
        grad, fresh = torch.randn(elements), torch.empty(elements)
        walls = []
        for _ in range(pushes):
            t0 = time.perf_counter()
            client.start(grad.data_ptr(), fresh.data_ptr(), [1e-3], _C.DType.float32)
            client.wait()
            walls.append(time.perf_counter() - t0)
        client.done()
        stats = json.loads(server.stats_json())
    finally:
        server.stop()
    gb = elements * 4 / 1e9
    return {"elements": elements, "optimizer": optimizer, "pushes": pushes,
            "kernel_gb_per_s": stats["applied_bytes"] / stats["apply_seconds"] / 1e9,
            "end_to_end_gb_per_s": gb / statistics.median(walls)}


def run(quick=False, rounds=1, progress=None):
    """Both parts; returns (markdown lines, json-able dict)."""
    budget = 1437 * (6 if quick else 12)  # global samples: epochs of the 1,437 training digits
    races = {"allreduce": [], "ps": []}
    for _ in range(rounds):
        for mode in ("allreduce", "ps"):  # alternate, so a slow spell of the machine hits both
            if progress:
                progress(f"digits {mode}")
            races[mode].append(digits_race(mode, 3.0, budget))
    med = {m: sorted(rs, key=lambda r: r["samples_per_s"])[len(rs) // 2] for m, rs in races.items()}
    if progress:
        progress("server apply rate")
    n = (1 << 22) if quick else (1 << 24)
    rates = [apply_rate(n, 5 if quick else 10, opt) for opt in ("sgd", "adam")]
    ar, ps = med["allreduce"], med["ps"]
    lines = ["## Parameter server vs AllReduce with a 3x straggler (digits, global batch 64)", "",
             f"Each run trains {budget} global samples; the last trainer sleeps 2x one plain step's compute after every step. "
             f"Medians of {rounds} round(s). {os.cpu_count()} cores: the server and 2 workers share them.", "",
             "| strategy | samples/s | updates/s | s to 95% | samples to 95% | final accuracy |", "|---|---|---|---|---|---|"]
    for name, r in (("AllReduceStrategy, 2 ranks", ar), ("ParameterServerStrategy, 1 server + 2 async workers", ps)):
        reached = r["reached"]
        lines.append(f"| {name} | {r['samples_per_s']:.0f} | {r['updates_per_s']:.1f} | "
                     f"{reached['seconds']:.2f} | {reached['samples']} |" if reached else
                     f"| {name} | {r['samples_per_s']:.0f} | {r['updates_per_s']:.1f} | not reached | - |")
        lines[-1] += f" {r['accuracy']:.4f} |"
    ratio = ps["samples_per_s"] / ar["samples_per_s"]
    lines += ["", f"PS / AllReduce samples/s with the straggler: **{ratio:.2f}x** (target 1.5x); final accuracy "
              f"{ps['accuracy']:.4f} vs {ar['accuracy']:.4f} (target: within 0.01).", "",
              "### One server's apply rate (float32 gradients, one core, loopback TCP)", "",
              "| optimizer | parameters | kernel GB/s | end-to-end GB/s (receive, apply, send back) |", "|---|---|---|---|"]
    for r in rates:
        lines.append(f"| {r['optimizer']} | {r['elements'] / 1e6:.1f}M | {r['kernel_gb_per_s']:.2f} | "
                     f"{r['end_to_end_gb_per_s']:.2f} |")
    return lines, {"budget_samples": budget, "races": races, "median": med, "ps_over_allreduce": ratio,
                   "apply": rates}


def plot(data, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    med = data["median"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = ["AllReduce (2 ranks)", "PS (1 server + 2)"]
    axes[0].bar(names, [med["allreduce"]["samples_per_s"], med["ps"]["samples_per_s"]], color=["#c66", "#2a7"])
    axes[0].set_ylabel("samples/s")
    axes[0].set_title("digits with a 3x straggler")
    rates = data["apply"]
    xs = range(len(rates))
    axes[1].bar([x - 0.2 for x in xs], [r["kernel_gb_per_s"] for r in rates], 0.4, label="kernel")
    axes[1].bar([x + 0.2 for x in xs], [r["end_to_end_gb_per_s"] for r in rates], 0.4, label="end to end")
    axes[1].axhline(1.0, ls="--", c="k", lw=1, label="target 1 GB/s")
    axes[1].set_xticks(list(xs), [r["optimizer"] for r in rates])
    axes[1].set_ylabel("GB/s of float32 gradient")
    axes[1].set_title("one server, one core")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    lines, data = run(args.quick, 1 if args.quick else args.rounds,
                      progress=lambda s: print(f"... {s}", file=sys.stderr, flush=True))
    write(lines, data, args.out)


def write(lines, data, out):
    md = "\n".join(lines)
    print(md)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scaling-ps.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "scaling-ps.json"), "w") as f:
        json.dump(data, f, indent=1)
    if plot(data, os.path.join(out, "scaling-ps.png")):
        print(f"wrote {out}/scaling-ps.png", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.path.insert(0, HERE)
    main()
