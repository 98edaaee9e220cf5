"""benchmarks/predict.py's alpha-beta model: the fit, the allreduce formulas, the step model."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.multiproc.harness import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import predict  # noqa: E402


def test_fit_recovers_alpha_and_beta_from_exact_points():
    alpha, beta = 12e-6, 3.5e9
    pts = [(n, 2 * alpha + n / beta) for n in (4096, 65536, 1 << 20, 16 << 20, 256 << 20)]
    a, b = predict.fit(pts)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)


def test_fit_of_noisy_points_stays_close():
    alpha, beta = 50e-6, 1.2e8
    pts = [(n, (2 * alpha + n / beta) * (1.05 if i % 2 else 0.95)) for i, n in
           enumerate([4096, 65536, 1 << 20, 4 << 20, 16 << 20])]
    a, b = predict.fit(pts)
    assert b == pytest.approx(beta, rel=0.1)
    assert a == pytest.approx(alpha, rel=0.5)


def test_ring_formulas():
    ab = (10e-6, 1e9)
    n = 100e6
    assert predict.allreduce_s(n, 1, 8, ab, ab, True) == 0.0
    assert predict.allreduce_s(0, 8, 8, ab, ab, True) == 0.0
    # one node of 8: 2(G-1) steps of N/G
    assert predict.allreduce_s(n, 8, 8, ab, ab, False) == pytest.approx(14 * (10e-6 + n / 8 / 1e9))
    # one device per node: hierarchical and flat are the same ring
    assert predict.allreduce_s(n, 16, 1, ab, ab, True) == pytest.approx(predict.allreduce_s(n, 16, 1, ab, ab, False))
    # many nodes: bandwidth terms meet at 2N/beta_x, hierarchical pays fewer network latencies
    intra, inter = (5e-6, 100e9), (20e-6, 10e9)
    flat = predict.allreduce_s(n, 1024, 8, intra, inter, False)
    hier = predict.allreduce_s(n, 1024, 8, intra, inter, True)
    assert hier < flat
    assert flat == pytest.approx(2 * 1023 * 20e-6 + 2 * 1023 / 1024 * n / 10e9)


def test_step_model_hides_reduction_behind_compute_but_not_the_last_bucket():
    ab = (10e-6, 1e9)
    small = predict.step_s(1e6, 1.0, 2, 1, ab, ab, "fp32", False, overlap=0.5)
    last = predict.allreduce_s(4e6, 2, 1, ab, ab, False)
    assert small[0] == pytest.approx(1.0 + last)  # all of it is the last bucket
    big = predict.step_s(1e9, 0.1, 2, 1, ab, ab, "fp32", False, overlap=0.5)
    assert big[0] == pytest.approx(0.1 + big[1] - 0.05)
    assert predict.step_s(1e9, 0.1, 2, 1, ab, ab, "fp32", False)[0] == pytest.approx(0.1 + big[1])  # no overlap
    fp16 = predict.step_s(1e9, 0.1, 2, 1, ab, ab, "fp16", False, overlap=0.5)
    assert fp16[1] == pytest.approx(big[1] / 2, rel=1e-3)
    assert predict.step_s(1e9, 0.1, 1, 1, ab, ab, "fp32", False)[0] == 0.1


def test_cli_writes_tables_and_checks_itself(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "dtrain.bench", "predict", "--out", str(tmp_path), "--params", "25.6e6",
                        "--gpus", "64", "--gpus-per-node", "8"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    d = json.load(open(tmp_path / "predict.json"))
    assert {"shm", "10gbit", "1gbit"} <= set(d["links"])
    for q in d["query"].values():
        assert 0 < q["efficiency"] <= 1 and math.isfinite(q["step_s"])
    assert d["query"]["fp16-hierarchical"]["allreduce_s"] < d["query"]["fp32-hierarchical"]["allreduce_s"]
    assert len(d["published"]) == len(predict.PUBLISHED)
    md = (tmp_path / "predict.md").read_text()
    assert "Against published results" in md and "Horovod" in md
    p = subprocess.run([sys.executable, "-m", "dtrain.bench", "predict", "--out", str(tmp_path), "--gpus", "12",
                        "--gpus-per-node", "8"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "not a whole number of nodes of 8" in p.stderr
