"""dtrain-bench horovod --quick on real ranks: every part reports, and the figures hang together.
The speed targets themselves are the benchmark's to check, not this test's."""

import json
import os
import subprocess
import sys

import pytest

from tests.multiproc.harness import REPO


@pytest.mark.timeout(300)
def test_quick_report(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "dtrain.bench", "horovod", "--quick", "--no-testbed", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=280, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.load(open(tmp_path / "horovod.json"))
    col = data["collectives"]
    assert set(col) == {"hvd.allreduce", "hvd.allreduce_", "hvd fp16", "dtrain.allreduce"}
    for v, by_size in col.items():
        secs = [by_size[k] for k in sorted(by_size, key=int)]
        assert all(s > 0 for s in secs) and secs[-1] > secs[0], (v, secs)  # 64 MiB takes longer than 4 KiB
    assert data["testbed_skipped"] == "--no-testbed"
    assert set(data["training"]) == {"hvd.DistributedOptimizer", "AllReduceStrategy"}
    assert [a["ranks"] for a in data["accuracy"]] == [2, 3, 4]
    for a in data["accuracy"]:
        # fp16 rounding is about 2^-11 of the values: far above float32's, far below 1
        assert a["fp32 sum"]["rms"] < a["dtrain"]["rms"] < 1e-1 and a["horovod"]["rms"] > 0
    md = (tmp_path / "horovod.md").read_text()
    assert "## Targets" in md and "hvd.allreduce at 4 KiB" in md
    assert (tmp_path / "horovod.png").stat().st_size > 10_000
