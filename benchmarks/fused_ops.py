"""Fused optimizer steps, tensor fusion and fused bias+GELU / LayerNorm against torch's,
in one run on one machine.

    python benchmarks/fused_ops.py                     # 1M, 10M, 100M parameters; 1 and 2 threads
    python benchmarks/fused_ops.py --quick --out bench-out

Each size is spread over ~200 float32 tensors (as a model's layers are). Times are
the median step over several trials after a warm-up step, for:
- FusedAdam against torch.optim.Adam(foreach=True) and Adam(fused=True)
- FusedSGD (momentum 0.9) against torch.optim.SGD(foreach=True)
and the achieved bandwidth (Adam moves 7 x 4 bytes per parameter: reads param, grad,
exp_avg, exp_avg_sq; writes param, exp_avg, exp_avg_sq; SGD with momentum 5 x 4).
Every case runs in turn, trial by trial (the five optimizers of one size, each on its own
parameters; dtrain's call and torch's for the rest), so a slow spell of the machine falls on all.

The process runs with the allocator settings dtrain.init() applies (dtrain.memory; torch and
dtrain alike; DTRAIN_MALLOC=0 for glibc's defaults): with glibc's defaults a call that returns a
new tensor above 32 MiB page-faults through it every time, which measures the allocator, not
the kernel (torch's cat + half at 10M parameters took 20 ms that way, against 3 ms).
Writes fused_ops.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from dtrain import memory  # noqa: E402
from dtrain.optim import FusedAdam, FusedSGD  # noqa: E402

CASES = {  # name -> (builder, bytes moved per parameter, peer it is measured against)
    "adam torch foreach": (lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), 28),
    "adam torch fused": (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), 28),
    "adam dtrain": (lambda ps: FusedAdam(ps, lr=1e-3), 28),
    "sgd torch foreach": (lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True), 20),
    "sgd dtrain": (lambda ps: FusedSGD(ps, lr=1e-3, momentum=0.9), 20),
}
TARGETS = [("adam dtrain", "adam torch foreach", 1.5), ("adam dtrain", "adam torch fused", 1.0),
           ("sgd dtrain", "sgd torch foreach", 1.0)]


def params(total: int, tensors: int = 200):
    g = torch.Generator().manual_seed(0)
    per = max(1, total // tensors)
    out = []
    for i in range(tensors):
        n = per + (i % 7) * 13  # uneven, as layers are
        p = torch.randn(n, generator=g).requires_grad_()
        p.grad = torch.randn(n, generator=g)
        out.append(p)
    return out


def time_steps(total, trials):
    """{case: (median seconds per step, parameters)} for every case of CASES at `total`
    parameters, each with its own parameters, stepped in turn, trial by trial, so a slow
    spell of the machine (memory bandwidth shared with its neighbours) falls on all alike."""
    opts = {}
    for name, (make, _) in CASES.items():
        opts[name] = make(params(total))
        opts[name].step()  # untimed: makes the state, plans and pages
    times = {name: [] for name in CASES}
    for _ in range(trials):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in opts["adam dtrain"].param_groups[0]["params"])
    del opts
    gc.collect()
    return {name: (statistics.median(t), n) for name, t in times.items()}


def fusion_cases(total):
    """Tensor fusion against torch: (name, dtrain fn, torch fn[, untimed set-up before each])
    over ~200 float32 tensors."""
    from dtrain import ops
    ts = [p.detach() for p in params(total)]
    n = sum(t.numel() for t in ts)
    out16 = torch.empty(n, dtype=torch.float16)
    flat32 = torch.empty(n)
    flat16 = ops.pack(ts, dtype=torch.float16)
    grads = [torch.randn_like(t) for t in ts]
    ps = [t.clone().requires_grad_() for t in ts]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    clipped = [p.grad for p in ps]

    def torch_unpack():
        off = 0
        for t in ts:
            t.add_(flat16[off:off + t.numel()].view(t.shape).float())
            off += t.numel()
    return n, [
        ("pack+cast fp16 (reused buffer)", lambda: ops.pack(ts, dtype=torch.float16, out=out16),
         lambda: out16.copy_(torch.cat([t.flatten() for t in ts], out=flat32))),
        ("pack+cast fp16 (new buffer)", lambda: ops.pack(ts, dtype=torch.float16),
         lambda: torch.cat([t.flatten() for t in ts]).half()),
        ("unpack fp16 + add", lambda: ops.unpack(flat16, ts, accumulate=True), torch_unpack),
        ("2-norm of all", lambda: ops.multi_tensor_norm(ts),
         lambda: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts]))),
        ("clip_grad_norm_ (under max)", lambda: ops.clip_grad_norm_(ps, 1e9),
         lambda: torch.nn.utils.clip_grad_norm_(ps, 1e9)),
        # Clipped grads stay at the limit, where the factor rounds to 1: put them back first.
        ("clip_grad_norm_ (clipping)", lambda: ops.clip_grad_norm_(ps, 1.0),
         lambda: torch.nn.utils.clip_grad_norm_(ps, 1.0), lambda: torch._foreach_copy_(clipped, grads)),
    ]


def nn_cases():
    """(name, dtrain fwd+bwd, torch eager fwd+bwd) on a transformer-sized activation."""
    import torch.nn.functional as F

    from dtrain import ops
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1024, generator=g).requires_grad_()
    b = torch.randn(1024, generator=g).requires_grad_()
    w = torch.randn(1024, generator=g).requires_grad_()
    dy = torch.randn(4096, 1024, generator=g)

    def step(fn):
        def run():
            x.grad = b.grad = w.grad = None
            fn().backward(dy)
        return run
    return [("bias+GELU", step(lambda: ops.fused_bias_gelu(x, b)), step(lambda: F.gelu(x + b))),
            ("LayerNorm", step(lambda: ops.fused_layer_norm(x, w, b)), step(lambda: F.layer_norm(x, (1024,), w, b)))]


def time_pair(mine, theirs, trials, seconds=0.0, prepare=None):
    """Median seconds of each of two calls over alternating trials, after one untimed call of
    each: `trials` of them, or more where they fit in `seconds` (small cases, whose medians
    over a few trials move with every other process on the machine). `prepare`, untimed,
    runs before every call."""
    prepare = prepare or (lambda: None)
    t0 = time.perf_counter()
    prepare(), mine(), prepare(), theirs()
    trials = max(trials, min(1000, int(seconds / max(time.perf_counter() - t0, 1e-6))))
    a, b = [], []
    for _ in range(trials):
        for fn, out in ((mine, a), (theirs, b)):
            prepare()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def plot(results, sizes, threads_list, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(threads_list), figsize=(6 * len(threads_list), 4), squeeze=False)
    for ax, th in zip(axes[0], threads_list):
        for name in CASES:
            ys = [results[f"{name}|{s}|{th}"]["gb_per_s"] for s in sizes if f"{name}|{s}|{th}" in results]
            ax.plot([s / 1e6 for s in sizes][:len(ys)], ys, marker="o", label=name,
                    linestyle="-" if "dtrain" in name else "--")
        ax.set_xscale("log")
        ax.set_xlabel("parameters (millions, ~200 tensors)")
        ax.set_ylabel("GB/s moved by the step")
        ax.set_title(f"{th} thread(s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _tensor_reader() -> str:
    """Waits for the tensor reader compiled against this torch (dtrain.ops._torch_reader;
    the first run on a machine builds it, ~20 s) so that no case is timed while it builds,
    and names the path the fused calls read tensor lists by."""
    from dtrain import ops
    from dtrain.ops import _torch_reader
    ops.pack([torch.ones(1)])  # starts it
    if _torch_reader.wait(600):
        return "dtrain's reader compiled against this torch (dtrain.ops._torch_reader)"
    return f"torch.Tensor's descriptors (the compiled reader: {_torch_reader.state()})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M and 10M parameters, fewer trials")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--sizes", default=None, help="comma-separated parameter counts")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    malloc = "dtrain.memory's settings" if memory.keep_freed_memory() else "glibc's defaults"
    reader = _tensor_reader()
    sizes = [int(float(s)) for s in args.sizes.split(",")] if args.sizes else (
        [10**6, 10**7] if args.quick else [10**6, 10**7, 10**8])
    threads_list = [int(t) for t in args.threads.split(",")]
    from tqdm import tqdm
    results = {}
    jobs = [(th, s) for th in threads_list for s in sizes]
    for th, s in tqdm(jobs, desc="fused ops", ncols=90, file=sys.stderr):
        torch.set_num_threads(th)
        # 100M: every case's step moves 2-3 GB at the memory's speed, where the machine's slow
        # spells decide a median of 7 (dtrain against torch fused: 0.99-1.11x over four runs).
        trials = 15 if s >= 10**8 else (9 if args.quick else 21)
        for name, (sec, n) in time_steps(s, trials).items():
            results[f"{name}|{s}|{th}"] = {"case": name, "params": n, "threads": th, "ms": sec * 1e3,
                                           "gb_per_s": n * CASES[name][1] / sec / 1e9}
    lines = [f"# Fused optimizer step, {os.cpu_count()} cores, float32, ~200 tensors, median step "
             f"(allocator: {malloc})\n",
             "| params | threads | case | ms/step | GB/s moved |", "|---:|---:|---|---:|---:|"]
    for th in threads_list:
        for s in sizes:
            for name in CASES:
                r = results[f"{name}|{s}|{th}"]
                lines.append(f"| {s / 1e6:g}M | {th} | {name} | {r['ms']:.2f} | {r['gb_per_s']:.1f} |")
    lines += ["", "| params | threads | ratio | measured | target |", "|---:|---:|---|---:|---:|"]
    for th in threads_list:
        for s in sizes:
            for mine, peer, target in TARGETS:
                ratio = results[f"{peer}|{s}|{th}"]["ms"] / results[f"{mine}|{s}|{th}"]["ms"]
                lines.append(f"| {s / 1e6:g}M | {th} | {mine} vs {peer} | {ratio:.2f}x | {target}x |")
    lines += ["", "## Tensor fusion (float32 tensors, ~200 of them)", "",
              f"Tensor lists read by: {reader}.", "",
              "| params | threads | op | dtrain ms | torch ms | speed-up |", "|---:|---:|---|---:|---:|---:|"]
    fusion = {}
    for th in threads_list:
        torch.set_num_threads(th)
        for s in sizes[:2]:
            n, cases = fusion_cases(s)
            for name, mine, theirs, *prepare in cases:
                a, b = time_pair(mine, theirs, 21, seconds=0.5, prepare=prepare[0] if prepare else None)
                fusion[f"{name}|{s}|{th}"] = {"dtrain_ms": a * 1e3, "torch_ms": b * 1e3}
                lines.append(f"| {s / 1e6:g}M | {th} | {name} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}x |")
    results["fusion"] = fusion
    lines += ["", "## bias+GELU and LayerNorm, forward + backward, [4096, 1024] float32", "",
              "| threads | op | dtrain ms | torch eager ms | speed-up | target |", "|---:|---|---:|---:|---:|---:|"]
    nn = {}
    for th in threads_list:
        torch.set_num_threads(th)
        for name, mine, theirs in nn_cases():
            a, b = time_pair(mine, theirs, 41, seconds=1.5)
            nn[f"{name}|{th}"] = {"dtrain_ms": a * 1e3, "torch_ms": b * 1e3}
            lines.append(f"| {th} | {name} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f}x | 1.3x |")
    results["nn"] = nn
    md = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fused_ops.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "fused_ops.json"), "w") as f:
        json.dump({"cores": os.cpu_count(), "torch": torch.__version__, "allocator": malloc, "tensor_reader": reader,
                   "results": results}, f,
                  indent=1)
    print(md)
    if plot(results, sizes, threads_list, os.path.join(args.out, "fused_ops.png")):
        print(f"wrote {args.out}/fused_ops.png", file=sys.stderr)


if __name__ == "__main__":
    main()
