"""The main job, as users run it: dtrain-run on 2 ranks, and plain python on one."""

import os
import re
import subprocess
import sys

import pytest

from tests.multiproc.harness import REPO

pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (pip install -e '.[examples]')")

SCRIPT = os.path.join(REPO, "examples", "train_digits.py")


def run(cmd, tmp_path, env=None):
    e = dict(os.environ, PYTHONPATH=REPO)
    e.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=str(tmp_path), env=e)
    return p.returncode, p.stdout.replace("\r", "\n"), p.stderr


def final_accuracy(out):
    summary = out.rpartition("summary")[2]
    m = re.search(r"test accuracy\s+([0-9.]+)", summary)
    assert m, f"no summary in the output:\n{out[-2000:]}"
    return float(m.group(1))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_train_digits_two_ranks_then_resume(tmp_path, compression):
    ck = str(tmp_path / "ck")
    rc, out, err = run([sys.executable, "-m", "dtrain.launch", "-n", "2", SCRIPT, "--compression", compression,
                        "--epochs", "12", "--checkpoint", ck], tmp_path, env={"DTRAIN_SHM_COMPRESSION": "1"})
    assert rc == 0, f"exit {rc}\n{out[-3000:]}\n{err[-3000:]}"
    assert final_accuracy(out) >= 0.95
    assert "[0] epoch  12/12" in out and "[1] epoch" not in out, "rank 0 alone should log epochs"
    assert f"wire           {'float32' if compression == 'none' else compression}" in out
    assert os.path.exists(os.path.join(ck, "checkpoint.pt"))
    rc, out, err = run([sys.executable, "-m", "dtrain.launch", "-n", "2", SCRIPT, "--compression", compression,
                        "--epochs", "14", "--checkpoint", ck, "--resume"], tmp_path)
    assert rc == 0, err[-3000:]
    assert "resumed from" in out and "after epoch 12" in out
    assert "epoch  13/14" in out and "epoch   1/14" not in out


@pytest.mark.timeout(300)
def test_train_digits_one_process(tmp_path):
    rc, out, err = run([sys.executable, SCRIPT, "--epochs", "12", "--checkpoint", str(tmp_path / "ck")], tmp_path)
    assert rc == 0, err[-3000:]
    assert final_accuracy(out) >= 0.95
    assert "ranks          1" in out


@pytest.mark.timeout(120)
def test_train_digits_fails_loudly_below_the_accuracy_bar(tmp_path):
    rc, out, err = run([sys.executable, SCRIPT, "--epochs", "1", "--lr", "1e-6", "--checkpoint",
                        str(tmp_path / "ck")], tmp_path)
    assert rc == 1
    assert "below --min-accuracy 0.95" in err
