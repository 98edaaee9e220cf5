"""`dtrain-bench NAME [args]`: runs one of the benchmarks in the checkout's benchmarks/ folder
with the same Python, passing the arguments on.

    dtrain-bench scaling --quick --out bench-out
    dtrain-bench pipeline --help

The benchmarks compare dtrain with its peers (gloo, Open MPI, DDP, tf.data, torch's
optimizers) in one run on one machine and write Markdown, JSON and PNG results. They live
beside the package, not in it: run this from an editable install (`pip install -e .`) or a
checkout.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional

BENCHMARKS = {  # name -> (script, what it measures)
    "allreduce": ("allreduce.py", "allreduce bandwidth: dtrain fp32/fp16/bf16 against gloo and Open MPI"),
    "input": ("input_pipeline.py", "TFRecord reading: dtrain against tf.data and the tfrecord package"),
    "fused": ("fused_ops.py", "fused optimizers, tensor fusion and fused norms against torch"),
    "scaling": ("scaling.py", "training steps on 1, 2, 4 ranks and the 2-host test bed: every strategy against DDP"),
    "predict": ("predict.py", "alpha-beta model of large clusters, fitted and checked here"),
    "horovod": ("horovod.py", "dtrain.horovod against Horovod's figures: latency, busbw, fp16 speed and accuracy, training"),
    "ps": ("ps_straggler.py", "parameter server against AllReduce with a straggler"),
    "pipeline": ("pipeline.py", "pipeline bubble and memory, tensor-parallel MLP against unsplit"),
}


def folder() -> Optional[str]:
    """The benchmarks/ folder beside the package (a checkout or an editable install), or None."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "benchmarks")
    return path if os.path.isdir(path) else None


def usage() -> str:
    width = max(len(n) for n in BENCHMARKS)
    rows = "\n".join(f"  {n:<{width}}  {what}" for n, (_, what) in BENCHMARKS.items())
    return f"usage: dtrain-bench NAME [args...]   (NAME --help for its options)\n\n{rows}\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        sys.stderr.write(f"dtrain-bench: no benchmark named {name!r}\n\n{usage()}")
        return 2
    where = folder()
    if where is None:
        sys.stderr.write("dtrain-bench: the benchmarks/ folder is not beside this dtrain installation; run it "
                         "from a checkout installed with `pip install -e .`\n")
        return 2
    script = os.path.join(where, BENCHMARKS[name][0])
    sys.argv = [script] + rest
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
