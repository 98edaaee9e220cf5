"""examples/train_transformer_pipeline.py as users run it: one process, 2 pipeline stages, 2-way
tensor parallel and 2 x 2 layouts learn the same model from the same seed."""

import os
import re
import subprocess
import sys

import pytest

from tests.multiproc.harness import REPO

SCRIPT = os.path.join(REPO, "examples", "train_transformer_pipeline.py")


def run(tmp_path, n, *args):
    launch = [sys.executable, "-m", "dtrain.launch", "-n", str(n)] if n > 1 else [sys.executable]
    cmd = launch + [SCRIPT, "--steps", "40", "--eval-every", "20", "--max-val-loss", "3.2",
                    "--checkpoint", str(tmp_path / f"ck{n}{'_'.join(args)}"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=REPO))
    out = p.stdout.replace("\r", "\n")
    assert p.returncode == 0, f"{cmd}\n{out[-3000:]}\n{p.stderr[-3000:]}"
    first = float(re.search(r"step 1 loss ([0-9.]+)", out).group(1))
    val = re.search(r"val loss\s+([0-9.]+) -> ([0-9.]+)", out)
    return out, first, float(val.group(1)), float(val.group(2))


@pytest.mark.timeout(600)
def test_every_layout_learns_the_same_model(tmp_path):
    out, first, before, after = run(tmp_path, 1)
    assert after < before - 1.0, f"validation loss {before} -> {after}: the model did not learn"
    for n, args, shards in ((2, ("--parallel", "pipeline"), 2), (2, ("--parallel", "tensor"), 2),
                            (4, ("--parallel", "tensor", "--model-parallel", "2"), 2),
                            (4, ("--parallel", "pipeline", "--model-parallel", "2", "--schedule", "gpipe"), 2)):
        o, f, b, a = run(tmp_path, n, *args)
        assert abs(f - first) < 1e-4 and abs(b - before) < 1e-4, (args, f, first, b, before)
        assert abs(a - after) < 2e-3, f"{n} ranks {args}: validation loss {a}, one process {after}"
        assert "[1]" not in o.split("summary")[1], "only rank 0 prints the summary"
        ck = tmp_path / f"ck{n}{'_'.join(args)}"
        assert sorted(p.name for p in ck.iterdir()) == [f"checkpoint-shard{i}-of-{shards}.pt" for i in range(shards)]
