"""Pipeline and tensor parallelism on this machine: step time and bubble, activation memory,
and the cost of a tensor-parallel MLP, each against its reference measured in the same run.

    python benchmarks/pipeline.py                 # 2 and 4 stages, m = 4..32; TP at three sizes
    python benchmarks/pipeline.py --quick --out bench-out

Pipeline: an MLP of 8 equal blocks (Linear(d, d) + tanh, d=1024) split evenly into p stages, one
thread per stage, micro-batches of a fixed 64 rows (so a micro-batch costs the same whatever
m is), 1F1B and GPipe. Per step: wall time (median of the timed steps) and the measured bubble
1 - (busiest stage's compute seconds) / (step seconds): the share of the step in which even
the stage that bounds the pipeline waits (fill, drain, transfers, Python between passes),
against the ideal (p-1)/(m+p-1) of equal stages with free communication. Stages are not quite
equal: the first computes no gradient for its input, so it is ~12% lighter; "mean idle"
(1 - sum of compute / (p x step)) counts that imbalance too.
The same batch on one process (no pipeline, same thread count) gives the speed-up.
4 stages on 2 cores share cores: their compute times stretch alike, the bubble stays
comparable, the speed-up does not.

Memory: the bytes autograd saves for backward on each stage at its peak, GPipe against 1F1B
(target: 1F1B <= p/m * GPipe + one micro-batch).

Tensor parallel: a transformer MLP (d -> 4d -> d, GELU) forward, backward and SGD step on
2 ranks at one thread each, against the unsplit MLP on one process at one thread (target:
at most 1.3x its step time).

Writes pipeline.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dtrain  # noqa: E402
import dtrain.launch  # noqa: E402

BLOCKS, D, ROWS = 8, 1024, 64


def blocks(d=D, n=BLOCKS):
    torch.manual_seed(0)
    mods = []
    for _ in range(n):
        mods += [nn.Linear(d, d), nn.Tanh()]
    return nn.Sequential(*mods)


def pipeline_rank(schedule, m, steps, warmup, d=D, rows=ROWS):
    """One stage: per timed step its step and compute seconds; its peak saved bytes and peak
    micro-batches in flight."""
    torch.set_num_threads(1)
    strategy = dtrain.PipelineStrategy(micro_batches=m, schedule=schedule, track_memory=True)
    stage, opt = strategy.prepare(blocks(d), None)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(m * rows, d, generator=g), torch.randn(m * rows, d, generator=g)
    times = []
    for i in range(warmup + steps):
        strategy.barrier()
        strategy.train_step((x, y), F.mse_loss)
        st = strategy.stats()
        if i >= warmup:
            times.append((st["step_s"], st["compute_s"]))
        for p in stage.parameters():
            p.grad = None
    st = strategy.stats()
    dtrain.shutdown()
    return {"step_s": [t[0] for t in times], "compute_s": [t[1] for t in times],
            "peak_saved_bytes": st["peak_saved_bytes"], "peak_in_flight": st["peak_in_flight"]}


def sequential(m, steps, warmup, d=D, rows=ROWS):
    """The same batch through the whole model on one process at one thread: median step seconds."""
    torch.set_num_threads(1)
    model = blocks(d)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(m * rows, d, generator=g), torch.randn(m * rows, d, generator=g)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        F.mse_loss(model(x), y).backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[warmup:])


def pipeline_case(p, m, schedule, steps, warmup, d=D, rows=ROWS):
    res = dtrain.launch.run(pipeline_rank, nprocs=p, args=(schedule, m, steps, warmup, d, rows), timeout=900)
    # per timed step: the slowest stage's step time, the busiest stage's compute, everyone's compute
    per_step = []
    for k in range(steps):
        step = max(r["step_s"][k] for r in res)
        busiest = max(r["compute_s"][k] for r in res)
        total = sum(r["compute_s"][k] for r in res)
        per_step.append((step, 1.0 - busiest / step, 1.0 - total / (p * step)))
    step_s = statistics.median(t[0] for t in per_step)
    bubble = statistics.median(t[1] for t in per_step)
    idle = statistics.median(t[2] for t in per_step)
    return {"p": p, "m": m, "schedule": schedule, "step_ms": step_s * 1e3, "bubble": max(0.0, bubble),
            "mean_idle": max(0.0, idle),
            "ideal": (p - 1) / (m + p - 1), "saved_bytes": [r["peak_saved_bytes"] for r in res],
            "in_flight": [r["peak_in_flight"] for r in res]}


# ---- tensor parallel

def mlp_step_times(d, rows, steps, warmup, parallel):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if parallel:
        from dtrain.parallel.tensor import ParallelMLP
        model = ParallelMLP(d, 4 * d)
    else:
        model = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, d, generator=g)
    times = []
    for i in range(warmup + steps):
        if parallel:
            dtrain.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    if parallel:
        dtrain.shutdown()
    return times[warmup:]


def tensor_case(d, rows, steps, warmup):
    single = statistics.median(mlp_step_times(d, rows, steps, warmup, False))
    res = dtrain.launch.run(mlp_step_times, nprocs=2, args=(d, rows, steps, warmup, True), timeout=900)
    tp = statistics.median(max(a, b) for a, b in zip(*res))
    return {"d": d, "rows": rows, "unsplit_ms": single * 1e3, "tp2_ms": tp * 1e3, "ratio": tp / single}


# ---- output

def markdown(results, machine):
    out = [f"# Pipeline and tensor parallelism, {machine}", "",
           f"Pipeline: {BLOCKS} blocks of Linear({D}, {D}) + tanh split evenly, {ROWS} rows per micro-batch, "
           "one thread per stage; bubble = 1 - busiest stage's compute / step, ideal (p-1)/(m+p-1); mean idle = "
           "1 - sum(stage compute) / (p x step), which adds the stages' imbalance; "
           "speed-up against the same batch on one process at one thread.", "",
           "| p | m | schedule | step ms | one process ms | speed-up | bubble | ideal | bubble / ideal | mean idle |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["pipeline"]:
        out.append(f"| {r['p']} | {r['m']} | {r['schedule']} | {r['step_ms']:.1f} | {r['sequential_ms']:.1f} | "
                   f"{r['sequential_ms'] / r['step_ms']:.2f}x | {r['bubble']:.3f} | {r['ideal']:.3f} | "
                   f"{r['bubble'] / r['ideal']:.2f} | {r['mean_idle']:.3f} |")
    out += ["", "Peak bytes saved for backward, stage 0 (the stage holding the most), and the bound "
            "p/m x GPipe + one micro-batch:", "",
            "| p | m | GPipe MB | 1F1B MB | one micro-batch MB | bound MB | 1F1B / GPipe | in flight (1F1B, per stage) |",
            "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in results["memory"]:
        out.append(f"| {row['p']} | {row['m']} | {row['gpipe'] / 1e6:.2f} | {row['1f1b'] / 1e6:.2f} | "
                   f"{row['one'] / 1e6:.3f} | {row['bound'] / 1e6:.2f} | {row['1f1b'] / row['gpipe']:.3f} | "
                   f"{row['in_flight']} |")
    out += ["", "Tensor-parallel MLP (d -> 4d -> d, GELU; forward, backward, SGD step), 2 ranks at one thread "
            "each against the unsplit MLP on one process at one thread:", "",
            "| d | rows | unsplit ms | 2-way TP ms | TP / unsplit |", "|---:|---:|---:|---:|---:|"]
    for r in results["tensor"]:
        out.append(f"| {r['d']} | {r['rows']} | {r['unsplit_ms']:.2f} | {r['tp2_ms']:.2f} | {r['ratio']:.2f}x |")
    out += ["", "Targets:", ""]
    for line in results["targets"]:
        out.append(f"- {line}")
    return "\n".join(out) + "\n"


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    for p in sorted({r["p"] for r in results["pipeline"]}):
        for sched, style in (("1f1b", "-"), ("gpipe", ":")):
            rows = [r for r in results["pipeline"] if r["p"] == p and r["schedule"] == sched]
            ax.plot([r["m"] for r in rows], [r["bubble"] for r in rows], style, marker="o", label=f"p={p} {sched}")
        rows = [r for r in results["pipeline"] if r["p"] == p and r["schedule"] == "1f1b"]
        ax.plot([r["m"] for r in rows], [r["ideal"] for r in rows], "--", color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble (idle share of stage time)")
    ax.set_title("measured bubble; dashed: ideal (p-1)/(m+p-1)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for p in sorted({r["p"] for r in results["memory"]}):
        rows = [r for r in results["memory"] if r["p"] == p]
        ax.plot([r["m"] for r in rows], [r["gpipe"] / 1e6 for r in rows], ":", marker="o", label=f"p={p} GPipe")
        ax.plot([r["m"] for r in rows], [r["1f1b"] / 1e6 for r in rows], "-", marker="o", label=f"p={p} 1F1B")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("stage 0 peak saved MB")
    ax.set_title("activation memory")
    ax.legend(fontsize=8)
    ax = axes[2]
    labels = [f"d={r['d']}\nrows={r['rows']}" for r in results["tensor"]]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [r["unsplit_ms"] for r in results["tensor"]], 0.4, label="unsplit, 1 process")
    ax.bar([x + 0.2 for x in xs], [r["tp2_ms"] for r in results["tensor"]], 0.4, label="2-way tensor parallel")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms per step (1 thread per rank)")
    ax.set_yscale("log")
    ax.set_title("tensor-parallel MLP step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer micro-batch counts and steps")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    steps, warmup = (5, 2) if args.quick else (11, 3)
    ms = [4, 8, 16] if args.quick else [4, 8, 16, 32]
    results = {"pipeline": [], "memory": [], "tensor": []}
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(x, **_):
            return x
    cases = [(p, m, s) for p in (2, 4) for m in ms for s in ("1f1b", "gpipe")]
    seq = {}
    for p, m, schedule in tqdm(cases, desc="pipeline", ncols=80):
        r = pipeline_case(p, m, schedule, steps, warmup)
        if m not in seq:
            seq[m] = sequential(m, steps, warmup) * 1e3
        r["sequential_ms"] = seq[m]
        results["pipeline"].append(r)
    for p in (2, 4):
        for m in ms:
            g = next(r for r in results["pipeline"] if (r["p"], r["m"], r["schedule"]) == (p, m, "gpipe"))
            o = next(r for r in results["pipeline"] if (r["p"], r["m"], r["schedule"]) == (p, m, "1f1b"))
            one = g["saved_bytes"][0] / m
            results["memory"].append({"p": p, "m": m, "gpipe": g["saved_bytes"][0], "1f1b": o["saved_bytes"][0],
                                      "one": one, "bound": p / m * g["saved_bytes"][0] + one,
                                      "in_flight": o["in_flight"]})
    sizes = [(256, 64), (512, 128), (1024, 256)] if not args.quick else [(256, 64), (1024, 256)]
    for d, rows in tqdm(sizes, desc="tensor parallel", ncols=80):
        results["tensor"].append(tensor_case(d, rows, steps, warmup))

    targets = []
    for p in (2, 4):
        r = next(r for r in results["pipeline"] if (r["p"], r["m"], r["schedule"]) == (p, 4 * p, "1f1b"))
        ok = r["bubble"] <= 1.25 * r["ideal"]
        targets.append(f"bubble at m=4p, p={p}, 1F1B: {r['bubble']:.3f} against ideal {r['ideal']:.3f} "
                       f"({r['bubble'] / r['ideal']:.2f}x; target <= 1.25x): {'met' if ok else 'MISSED'}")
    worst = max(results["memory"], key=lambda r: r["1f1b"] / r["bound"])
    targets.append(f"1F1B memory within p/m x GPipe + one micro-batch in every case: "
                   f"{'met' if all(r['1f1b'] <= r['bound'] for r in results['memory']) else 'MISSED'} "
                   f"(closest: p={worst['p']} m={worst['m']}, {worst['1f1b'] / worst['bound']:.2f} of the bound)")
    worst_tp = max(results["tensor"], key=lambda r: r["ratio"])
    targets.append(f"tensor-parallel MLP at most 1.3x the unsplit step: worst {worst_tp['ratio']:.2f}x "
                   f"(d={worst_tp['d']}): {'met' if worst_tp['ratio'] <= 1.3 else 'MISSED'}")
    results["targets"] = targets
    results["machine"] = f"{os.cpu_count()} cores, torch {torch.__version__}"

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pipeline.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results, results["machine"])
    with open(os.path.join(args.out, "pipeline.md"), "w") as f:
        f.write(md)
    plot(results, os.path.join(args.out, "pipeline.png"))
    print(md)


if __name__ == "__main__":
    main()
