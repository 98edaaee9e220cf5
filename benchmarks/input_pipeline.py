"""Input pipeline throughput: dtrain's TFRecordDataset against tf.data and the `tfrecord`
package, on the same files in one run.

    python benchmarks/input_pipeline.py                 # 8 files x 25,000 records, both variants
    python benchmarks/input_pipeline.py --quick --out bench-out
    python benchmarks/input_pipeline.py --peers dtrain,tf.data --variants image

Each peer reads every file, checks CRCs where it can, parses each Example (a bytes
image decoded to uint8, an int64 label, 16 floats) and batches 256 records into
tensors:

- dtrain: TFRecordDataset(files, spec).batch(256).prefetch(4)
- tf.data: TFRecordDataset(files).batch(256).map(parse_example + decode_raw,
  num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE); files are read one after another
  because num_parallel_reads=AUTOTUNE was 10x slower here (BENCH_TF_PARALLEL_READS=1
  measures it that way)
- tfrecord: its TFRecordDataset per file (sharded over workers by its index), chained,
  through a torch DataLoader with 2 workers and batch_size 256

Variants: "image" (a 3,072-byte image; ~3.2 KB records) and "small" (a 128-byte
image; ~230 B records). Every peer runs in its own process, first one untimed pass
(to warm the page cache and the peer), then timed passes; the median is reported.
Writes input_pipeline.{json,md,png} into --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = {"image": 3072, "small": 128}  # image bytes per record
PEERS = ["dtrain", "tf.data", "tfrecord"]
BATCH = 256


# ---------------------------------------------------------------- data
def make_files(root: str, variant: str, files: int, per_file: int) -> list:
    """Writes (once) `files` TFRecord files of `per_file` Examples and their index files."""
    sys.path.insert(0, ROOT)
    import numpy as np

    from dtrain import data
    d = os.path.join(root, f"{variant}-{files}x{per_file}")
    paths = [os.path.join(d, f"part-{i:03d}.tfrecord") for i in range(files)]
    if all(os.path.exists(p + ".idx") for p in paths):
        return paths
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    nbytes = VARIANTS[variant]
    for p in paths:
        with data.TFRecordWriter(p) as w:
            imgs = rng.integers(0, 256, (per_file, nbytes), dtype=np.uint8)
            labels = rng.integers(0, 1000, per_file)
            floats = rng.standard_normal((per_file, 16)).astype(np.float32)
            for k in range(per_file):
                w.write({"image": imgs[k].tobytes(), "label": int(labels[k]), "floats": floats[k]})
        data.build_index(p)
    return paths


# ---------------------------------------------------------------- peers (each in its own process)
def run_dtrain(paths, nbytes, batch, workers):
    sys.path.insert(0, ROOT)
    from dtrain import data
    spec = {"image": data.FixedLen((nbytes,), "uint8"), "label": data.FixedLen((), "int64"),
            "floats": data.FixedLen((16,), "float32")}
    ds = data.TFRecordDataset(paths, spec, workers=workers).batch(batch).prefetch(4)

    def one_pass():
        n = 0
        for b in ds:
            n += b["label"].shape[0]
        return n
    return one_pass, {"threads": ds.workers + 1}


def run_tfdata(paths, nbytes, batch, workers):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    feats = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64),
             "floats": tf.io.FixedLenFeature([16], tf.float32)}

    def parse(x):
        ex = tf.io.parse_example(x, feats)
        ex["image"] = tf.io.decode_raw(ex["image"], tf.uint8)
        return ex
    # Files read one after another: num_parallel_reads=AUTOTUNE was 10x slower on the
    # 2-core machine these figures come from (32k against 330k records/s).
    reads = tf.data.AUTOTUNE if os.environ.get("BENCH_TF_PARALLEL_READS") else None
    ds = (tf.data.TFRecordDataset(paths, num_parallel_reads=reads).batch(batch)
          .map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))

    def one_pass():
        n = 0
        for b in ds:
            n += int(b["label"].shape[0])
        return n
    return one_pass, {}


def run_tfrecord(paths, nbytes, batch, workers):
    import torch
    from tfrecord.torch.dataset import TFRecordDataset
    desc = {"image": "byte", "label": "int", "floats": "float"}
    chain = torch.utils.data.ChainDataset([TFRecordDataset(p, p + ".idx", desc) for p in paths])
    loader = torch.utils.data.DataLoader(chain, batch_size=batch, num_workers=2)

    def one_pass():
        n = 0
        for b in loader:
            n += b["label"].shape[0]
        return n
    return one_pass, {}


RUNNERS = {"dtrain": run_dtrain, "tf.data": run_tfdata, "tfrecord": run_tfrecord}


def worker(args) -> None:
    paths = sorted(glob.glob(os.path.join(args.dir, "*.tfrecord")))
    nbytes = VARIANTS[args.variant]
    one_pass, extra = RUNNERS[args.worker](paths, nbytes, args.batch, args.threads)
    expect = sum(len(open(p + ".idx").read().splitlines()) for p in paths)
    got = one_pass()  # warm-up: page cache, thread pools, graph tracing
    if got != expect:
        raise SystemExit(f"{args.worker} read {got} records, the files hold {expect}")
    times, cpus = [], []
    for _ in range(args.passes):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        got = one_pass()
        t = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if got != expect:
            raise SystemExit(f"{args.worker} read {got} records, the files hold {expect}")
        times.append(t)
        cpus.append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                    + (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime))
    t = statistics.median(times)
    size = sum(os.path.getsize(p) for p in paths)
    out = {"records": expect, "seconds": t, "records_per_s": expect / t, "mb_per_s": size / t / 1e6,
           "cores_busy": statistics.median(c / s for c, s in zip(cpus, times)),
           "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- report
def table(results, variants, peers) -> str:
    lines = ["| variant | peer | records/s | MB/s | cores busy | peak RSS MB | dtrain speed-up |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for v in variants:
        mine = results.get(v, {}).get("dtrain")
        for p in peers:
            r = results.get(v, {}).get(p)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {v} | {p} | failed: {r['error'][:60]} | | | | |")
                continue
            ratio = f"{mine['records_per_s'] / r['records_per_s']:.2f}x" if mine and "error" not in mine else ""
            lines.append(f"| {v} | {p} | {r['records_per_s']:,.0f} | {r['mb_per_s']:,.0f} | {r['cores_busy']:.2f} | "
                         f"{r['max_rss_mb']:,.0f} | {ratio if p != 'dtrain' else ''} |")
    return "\n".join(lines)


def plot(results, variants, peers, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 4), squeeze=False)
    for ax, v in zip(axes[0], variants):
        names = [p for p in peers if "records_per_s" in results.get(v, {}).get(p, {})]
        vals = [results[v][p]["records_per_s"] / 1e3 for p in names]
        bars = ax.bar(names, vals, color=["#2a7ab0" if p == "dtrain" else "#999999" for p in names])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(f"{v} records ({VARIANTS[v]}-byte image)")
        ax.set_ylabel("thousand records / s")
    fig.suptitle(f"TFRecord read + parse + batch({BATCH}), one machine, {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 files x 5,000 records, 2 timed passes")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--data", default="/tmp/dtrain-bench-input", help="where the files are written (kept)")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--records", type=int, default=None, help="per file (default 25,000; --quick 5,000)")
    ap.add_argument("--passes", type=int, default=None, help="timed passes per peer (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="dtrain worker threads (default: cores)")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.records = args.records or (5000 if args.quick else 25000)
    args.passes = args.passes or (2 if args.quick else 5)
    if args.worker:
        worker(args)
        return
    peers = [p for p in args.peers.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    for name, given, known in (("peer", peers, PEERS), ("variant", variants, list(VARIANTS))):
        bad = [x for x in given if x not in known]
        if bad:
            ap.error(f"unknown {name}(s) {bad}; choose from {known}")
    from tqdm import tqdm
    results: dict = {}
    jobs = [(v, p) for v in variants for p in peers]
    bar = tqdm(jobs, desc="input pipeline", ncols=90, file=sys.stderr)
    for v, p in bar:
        bar.set_postfix_str(f"{v}/{p}")
        paths = make_files(args.data, v, args.files, args.records)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", p, "--variant", v, "--dir",
               os.path.dirname(paths[0]), "--passes", str(args.passes), "--batch", str(args.batch)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        got = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not got:
            err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            results.setdefault(v, {})[p] = {"error": err}
            print(f"{v}/{p} failed: {err}", file=sys.stderr)
            continue
        results.setdefault(v, {})[p] = json.loads(got[0][7:])
    os.makedirs(args.out, exist_ok=True)
    meta = {"files": args.files, "records_per_file": args.records, "batch": args.batch, "passes": args.passes,
            "cores": os.cpu_count(), "python": sys.version.split()[0]}
    with open(os.path.join(args.out, "input_pipeline.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    md = (f"# Input pipeline: {args.files} files x {args.records:,} records, batch {args.batch}, "
          f"median of {args.passes} passes, {os.cpu_count()} cores\n\n" + table(results, variants, peers) + "\n")
    with open(os.path.join(args.out, "input_pipeline.md"), "w") as f:
        f.write(md)
    print(md)
    if plot(results, variants, peers, os.path.join(args.out, "input_pipeline.png")):
        print(f"wrote {args.out}/input_pipeline.png", file=sys.stderr)


if __name__ == "__main__":
    main()
