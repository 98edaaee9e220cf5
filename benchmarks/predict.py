"""An alpha-beta model of data-parallel training on large clusters, fitted to allreduces measured
here and checked against the training steps measured here.

    dtrain-bench predict --params 25.6e6 --gpus 1024 --gpus-per-node 8 --step-time 0.25 \\
        --intra-bw 300 --inter-bw 100 --wire fp16
    dtrain-bench predict --measure          # re-measure the allreduces first (a few minutes)

The model. Sending n bytes over a link costs alpha + n / beta. A ring allreduce of N bytes over
G devices takes 2(G-1) steps of N/G bytes, each as slow as the slowest link it crosses:
  flat (one ring through every device; on several nodes every step crosses the network)
      T = 2(G-1) * (alpha_x + N / (G * beta_x))            (alpha_i, beta_i on one node)
  hierarchical (reduce-scatter in the node, L rings across the M = G/L nodes sharing each
  node's network link, allgather in the node)
      T = 2[(L-1) alpha_i + (L-1)/L * N / beta_i] + 2(M-1) alpha_x + 2(M-1)/M * N / beta_x
A training step overlaps gradient reduction with backward, except the last bucket:
      step = S + max(T(N) - f * S, T(min(N, bucket)))
with S the one-device step time (here: n plain processes at the same placement) and f the share of it reduction can hide behind, and
efficiency = S / step (weak scaling: the per-device batch is fixed). f defaults to 0, the
conservative bound. It is also what this machine measures: its ranks fill its cores, so
communication's host work (kernel TCP, copies, fp16 conversion) competes with compute instead
of hiding behind it. A GPU cluster, where NCCL and the NIC move bytes while the GPU computes,
hides more (up to about the backward pass, 2/3 of a step): try --overlap 0.5.
Checked here, a compressed wire also costs the CPU reducer's passes over the float32
gradients (copy in and out; fp16 adds its scale and max-abs), at the memory stream rate of
one thread, measured when predict runs; on GPUs those passes take microseconds.

alpha and beta per link type are fitted (least relative squares) to dtrain's fp32 allreduce
times: shared memory from benchmarks/results/allreduce.json, the test bed's 10 and 1 Gbit/s
links from allreduce-testbed-2x1-*.json. For another link, --inter-bw/--intra-bw give beta
(GB/s for intra, Gbit/s for inter, nominal; derated by the efficiency dtrain reached on the
test bed's links) and the alphas are the fitted ones unless given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BUCKET = 25 << 20  # AllReduceStrategy's default bucket_mb, in float32 bytes
WIRE_BYTES = {"fp32": 4, "fp16": 2}

# Published data-parallel results: (what, params, GPUs, GPUs per node, assumed one-GPU step s,
# intra GB/s per direction, inter Gbit/s, wire, reported efficiency, source and assumptions).
PUBLISHED = [
    ("Horovod, Inception V3", 23.8e6, 128, 4, 0.45, 10, 25, "fp32", 0.88,
     "Sergeev & Del Balso 2018: 32 servers x 4 P100 (PCIe), 25 Gbit/s RoCE, 64 images/GPU; "
     "step assumed 0.45 s (about 140 images/s on one P100)"),
    ("Horovod, ResNet-101", 44.5e6, 128, 4, 0.50, 10, 25, "fp32", 0.88,
     "same cluster; step assumed 0.50 s (about 128 images/s on one P100)"),
    ("Goyal et al., ResNet-50", 25.6e6, 256, 8, 0.23, 20, 50, "fp32", 0.90,
     "Goyal et al. 2017: 32 servers x 8 P100 (NVLink), 50 Gbit/s Ethernet, 32 images/GPU, ~90% from 8 "
     "to 256 GPUs; step assumed 0.23 s (one hour for 90 epochs is 0.26 s a step at 256 GPUs)"),
    ("Akiba et al., ResNet-50", 25.6e6, 1024, 8, 0.20, 10, 56, "fp16", None,
     "Akiba et al. 2017: 1,024 P100 (128 nodes x 8, PCIe), InfiniBand FDR 56 Gbit/s, fp16 allreduce, "
     "32 images/GPU; 90 epochs in 15 min is 0.256 s a step; no efficiency published (one-GPU step "
     "assumed 0.20 s, so 0.256 s would be 78%)"),
]


# ---------------------------------------------------------------- fitting


def fit(points):
    """(alpha, beta) of a 2-rank ring allreduce, T = 2 alpha + N / beta, minimising relative
    squared error over (bytes, seconds) points."""
    # weighted least squares on T = a + b N with weights 1/T
    sw = swx = swxx = swy = swxy = 0.0
    for n, t in points:
        w = 1.0 / (t * t)
        sw += w
        swx += w * n
        swxx += w * n * n
        swy += w * t
        swxy += w * n * t
    det = sw * swxx - swx * swx
    b = (sw * swxy - swx * swy) / det
    a = (swy - b * swx) / sw
    return max(a / 2, 0.0), 1.0 / b if b > 0 else math.inf


def points_of(path, peer="dtrain"):
    with open(path) as f:
        d = json.load(f)
    return [(int(size), row[peer]["time_us"] * 1e-6) for size, row in d["results"].items() if peer in row]


def fitted_links(results):
    """{'shm': (alpha, beta), '10gbit': ..., '1gbit': ...} from the allreduce results in `results`,
    with each fit's worst relative error."""
    files = {"shm": "allreduce.json", "10gbit": "allreduce-testbed-2x1-10gbit.json",
             "1gbit": "allreduce-testbed-2x1-1gbit.json"}
    links = {}
    for name, fname in files.items():
        path = os.path.join(results, fname)
        if not os.path.exists(path):
            continue
        pts = points_of(path)
        alpha, beta = fit(pts)
        worst = max(abs(2 * alpha + n / beta - t) / t for n, t in pts)
        links[name] = {"alpha_s": alpha, "beta_Bps": beta, "fit_max_rel_err": worst, "points": len(pts),
                       "source": fname}
    return links


# ---------------------------------------------------------------- the model


def allreduce_s(nbytes, gpus, per_node, intra, inter, hierarchical):
    """Seconds for a ring allreduce of `nbytes` (wire bytes); intra/inter are (alpha, beta)."""
    if gpus <= 1 or nbytes == 0:
        return 0.0
    nodes = max(1, gpus // per_node)
    if nodes == 1:
        a, b = intra
        return 2 * (gpus - 1) * (a + nbytes / (gpus * b))
    ai, bi = intra
    ax, bx = inter
    if not hierarchical:
        return 2 * (gpus - 1) * (ax + nbytes / (gpus * bx))
    local = per_node
    t_local = (local - 1) * ai + (local - 1) / local * nbytes / bi if local > 1 else 0.0
    return 2 * t_local + 2 * (nodes - 1) * ax + 2 * (nodes - 1) / nodes * nbytes / bx


def step_s(params, step, gpus, per_node, intra, inter, wire, hierarchical, overlap=0.0):
    """(predicted step seconds, allreduce seconds, exposed seconds)."""
    nbytes = params * WIRE_BYTES[wire]
    t = allreduce_s(nbytes, gpus, per_node, intra, inter, hierarchical)
    last = allreduce_s(min(params * 4, BUCKET) * WIRE_BYTES[wire] / 4, gpus, per_node, intra, inter, hierarchical)
    exposed = max(t - overlap * step, last) if gpus > 1 else 0.0
    return step + exposed, t, exposed


# ---------------------------------------------------------------- checking against this machine


def host_stream_Bps() -> float:
    """Bytes per second one thread of this machine streams through memory (read + write of a
    64 MiB float32 copy), what the reducer's CPU passes over gradients move at."""
    import time

    import torch
    torch.set_num_threads(1)
    src = torch.randn(16 << 20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


# Streams over the float32 gradient the CPU reducer makes for a compressed wire: copy into the
# bucket (read + write), copy back out (read + write); fp16 adds the scale (read + write) and
# the max-abs for the next scale (read).
HOST_STREAMS = {"allreduce-bf16": 4, "allreduce-fp16": 7}


def validate(links, scaling_path, overlap):
    """Predicted vs measured step time for every dtrain AllReduce point in scaling.json."""
    if not os.path.exists(scaling_path):
        return [], f"{scaling_path} not found: run `dtrain-bench scaling` first"
    with open(scaling_path) as f:
        sc = json.load(f)
    rows = []
    stream = None
    for model, res in sc["results"].items():
        params = sc["params"][model]
        for key, r in res.items():
            peer, place, n = key.split("@")
            if not peer.startswith("allreduce"):
                continue
            n = int(n)
            wire = "fp16" if peer == "allreduce-fp16" else "fp32"  # bf16 moves the same bytes as fp16
            if peer == "allreduce-bf16":
                wire = "fp16"
            nocomm = res.get(f"no-comm@{place}@{n}") or res.get(f"no-comm@local@{n}")  # same placement first
            if nocomm is None:
                continue
            if place == "local":
                link, per_node = "shm", n
                wire = "fp32"  # one host: float32 on the wire whatever compression asks
            else:
                link, per_node = place, 1
            if link not in links:
                continue
            ab = (links[link]["alpha_s"], links[link]["beta_Bps"])
            pred, t_ar, exposed = step_s(params, nocomm["sec_per_step"], n, per_node, ab, ab, wire, False, overlap)
            host = 0.0
            if place != "local" and peer in HOST_STREAMS:  # one host never compresses: nothing to add
                stream = stream or host_stream_Bps()
                host = HOST_STREAMS[peer] * params * 4 / stream
            pred += host
            meas = r["sec_per_step"]
            rows.append({"model": model, "peer": peer, "place": place, "ranks": n, "compute_s": nocomm["sec_per_step"],
                         "allreduce_s": t_ar, "host_s": host, "predicted_s": pred, "measured_s": meas,
                         "error": pred / meas - 1.0, "oversubscribed": n > sc.get("cores", n)})
    return rows, None


# ---------------------------------------------------------------- the report


def derate(links):
    """The share of a link's nominal rate dtrain's allreduce reached on the test bed."""
    shares = []
    for name, rate in (("10gbit", 10e9 / 8), ("1gbit", 1e9 / 8)):
        if name in links:
            shares.append(links[name]["beta_Bps"] / rate)
    return min(1.0, sum(shares) / len(shares)) if shares else 0.9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=25.6e6, help="model parameters (ResNet-50: 25.6e6)")
    ap.add_argument("--gpus", type=int, default=1024)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--step-time", type=float, default=0.25, help="one device's step time in seconds")
    ap.add_argument("--intra-bw", type=float, default=300.0, help="GB/s per direction within a node (NVLink)")
    ap.add_argument("--inter-bw", type=float, default=100.0, help="Gbit/s of each node's network link")
    ap.add_argument("--intra-latency", type=float, default=None, help="seconds (default: fitted, shared memory)")
    ap.add_argument("--inter-latency", type=float, default=None, help="seconds (default: fitted, test bed)")
    ap.add_argument("--wire", choices=["fp32", "fp16", "both"], default="both")
    ap.add_argument("--overlap", type=float, default=0.0,
                    help="share of the one-device step the reduction can hide behind (default 0: none, the "
                         "conservative bound, and what this machine shows)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"),
                    help="folder with allreduce*.json and scaling.json (default benchmarks/results)")
    ap.add_argument("--scaling", default=None,
                    help="scaling.json to check the model against (default: the one in --results)")
    ap.add_argument("--measure", action="store_true",
                    help="first re-measure the allreduces (here and on the test bed) into --out")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="with --measure: fewer trials")
    args = ap.parse_args(argv)
    for name in ("params", "gpus", "gpus_per_node", "step_time", "intra_bw", "inter_bw"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.gpus % args.gpus_per_node and args.gpus > args.gpus_per_node:
        ap.error(f"--gpus {args.gpus} is not a whole number of nodes of {args.gpus_per_node}")
    if not 0 <= args.overlap <= 1:
        ap.error(f"--overlap is a share of the step between 0 and 1, got {args.overlap}")
    os.makedirs(args.out, exist_ok=True)
    results = args.results
    if args.measure:
        script = os.path.join(HERE, "allreduce.py")
        quick = ["--quick"] if args.quick else []
        for extra in ([], ["--hosts", "2", "--rate", "10gbit"], ["--hosts", "2", "--rate", "1gbit"]):
            print(f"predict: measuring allreduce {' '.join(extra) or 'on this host'}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, script, "--out", args.out, "--peers", "dtrain"] + extra + quick,
                           check=True, stdout=subprocess.DEVNULL)
        results = args.out
    links = fitted_links(results)
    if "shm" not in links:
        ap.error(f"no allreduce results in {results}: run `dtrain-bench allreduce` or pass --measure")
    ours = derate(links)
    inter_lat = args.inter_latency if args.inter_latency is not None else \
        links.get("10gbit", links["shm"])["alpha_s"]
    intra_lat = args.intra_latency if args.intra_latency is not None else links["shm"]["alpha_s"]
    intra = (intra_lat, args.intra_bw * 1e9 * ours)
    inter = (inter_lat, args.inter_bw * 1e9 / 8 * ours)

    lines = ["## Predicting data-parallel scaling (alpha-beta model)", "",
             "### Links fitted to dtrain's fp32 allreduce (2 ranks)", "",
             "| link | alpha (latency) | beta (bandwidth) | worst fit error | points | from |", "|---|---|---|---|---|---|"]
    for name, l in links.items():
        lines.append(f"| {name} | {l['alpha_s'] * 1e6:.1f} us | {l['beta_Bps'] / 1e9:.3f} GB/s | "
                     f"{l['fit_max_rel_err']:.0%} | {l['points']} | {l['source']} |")
    lines.append(f"\nOther links are derated to {ours:.0%} of nominal (what dtrain reached on the test bed's links).")

    rows, why = validate(links, args.scaling or os.path.join(args.results, "scaling.json"), args.overlap)
    lines += ["", f"### Checked against training steps measured here ({os.path.basename(args.scaling or 'scaling.json')})", ""]
    if why:
        lines.append(why)
    else:
        lines += ["| model | peer | placement | ranks | compute ms (no-comm) | allreduce ms | host passes ms | "
                  "predicted ms | measured ms | error |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model'].split()[0]} | {r['peer']} | {r['place']} | {r['ranks']} | "
                         f"{r['compute_s'] * 1e3:.1f} | {r['allreduce_s'] * 1e3:.1f} | {r['host_s'] * 1e3:.1f} | "
                         f"{r['predicted_s'] * 1e3:.1f} | "
                         f"{r['measured_s'] * 1e3:.1f} | {r['error']:+.0%}{' *' if r['oversubscribed'] else ''} |")
        fair = [r for r in rows if not r["oversubscribed"]]
        worst = max((abs(r["error"]) for r in fair), default=None)
        if worst is not None:
            lines.append(f"\nWorst error {worst:.0%} over the {len(fair)} points where every rank has a core (target: "
                         f"within 20%: {'met' if worst <= 0.20 else 'missed'}). Overlap f = {args.overlap:g}.")
        if len(fair) < len(rows):
            over = max(abs(r["error"]) for r in rows if r["oversubscribed"])
            lines.append(f"\\* ranks outnumber cores: the scheduler time-slices the ranks, so a ring step waits for a "
                         f"descheduled peer; the model has no term for that (worst error there {over:.0%}).")

    wires = ["fp32", "fp16"] if args.wire == "both" else [args.wire]
    lines += ["", f"### Your cluster: {args.params / 1e6:.1f}M parameters, {args.gpus} GPUs, {args.gpus_per_node} per "
              f"node, {args.intra_bw:g} GB/s in a node, {args.inter_bw:g} Gbit/s between nodes, one-GPU step "
              f"{args.step_time * 1e3:.0f} ms", "",
              "| wire | allreduce | allreduce ms | exposed ms | step ms | efficiency |", "|---|---|---|---|---|---|"]
    query = {}
    for wire in wires:
        for hier in (False, True):
            pred, t_ar, exposed = step_s(args.params, args.step_time, args.gpus, args.gpus_per_node, intra, inter,
                                         wire, hier, args.overlap)
            query[f"{wire}-{'hierarchical' if hier else 'flat'}"] = {"step_s": pred, "allreduce_s": t_ar,
                                                                     "efficiency": args.step_time / pred}
            lines.append(f"| {wire} | {'hierarchical' if hier else 'flat'} | {t_ar * 1e3:.1f} | {exposed * 1e3:.1f} | "
                         f"{pred * 1e3:.1f} | {args.step_time / pred:.0%} |")

    lines += ["", "### Against published results (hierarchical allreduce, the assumptions stated)", "",
              "| run | params | GPUs | predicted efficiency | reported | assumptions |", "|---|---|---|---|---|---|"]
    published = []
    for what, params, gpus, per, step, intra_gbs, inter_gbit, wire, reported, note in PUBLISHED:
        pi = (intra_lat, intra_gbs * 1e9 * ours)
        px = (inter_lat, inter_gbit * 1e9 / 8 * ours)
        pred, t_ar, _ = step_s(params, step, gpus, per, pi, px, wire, True, args.overlap)
        eff = step / pred
        published.append({"run": what, "predicted_efficiency": eff, "reported": reported, "predicted_step_s": pred})
        lines.append(f"| {what} | {params / 1e6:.1f}M | {gpus} | {eff:.0%} (step {pred * 1e3:.0f} ms) | "
                     f"{f'{reported:.0%}' if reported else '-'} | {note} |")
    md = "\n".join(lines)
    print(md)
    with open(os.path.join(args.out, "predict.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "predict.json"), "w") as f:
        json.dump({"links": links, "derate": ours, "overlap": args.overlap, "validation": rows, "query": query,
                   "published": published, "args": vars(args)}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    gs = [g for g in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if g <= max(args.gpus, 8)]
    for wire in wires:
        for hier, ls in ((False, "--"), (True, "-")):
            eff = [args.step_time / step_s(args.params, args.step_time, g, min(g, args.gpus_per_node), intra, inter,
                                           wire, hier, args.overlap)[0] for g in gs]
            ax.plot(gs, eff, ls, marker="o", ms=3, label=f"{wire}, {'hierarchical' if hier else 'flat'}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("predicted efficiency")
    ax.set_title(f"{args.params / 1e6:.1f}M params, step {args.step_time * 1e3:.0f} ms, "
                 f"{args.gpus_per_node}/node, {args.inter_bw:g} Gbit/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "predict.png"), dpi=110)
    print(f"wrote {args.out}/predict.png", file=sys.stderr)


if __name__ == "__main__":
    main()
