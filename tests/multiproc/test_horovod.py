"""dtrain.horovod on real ranks (2 and 3), written from Horovod's documented behaviour."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.multiproc import horovod_workers as hw
from tests.multiproc.harness import REPO, ranks, script

WORLDS = [2, 3]
# The wire rounds each of n contributions to fp16 (2^-11 relative) and adds in float32, plus
# float32 rounding of the updates over the steps; measured about 1e-4 after 6 steps.
FP16_TOL = 2e-3
FP32_TOL = 2e-6


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", WORLDS)
def test_basics(world):
    assert sorted(ranks(hw.basics, world, timeout=90)) == list(range(world))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
def test_allreduce_every_op_dtype_size_and_form(world):
    ranks(hw.allreduce_values, world, 7, timeout=280)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", WORLDS)
def test_grouped_forms(world):
    ranks(hw.grouped, world, 3, timeout=120)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", WORLDS)
def test_allgather_broadcast_alltoall_reducescatter(world):
    ranks(hw.gather_broadcast_alltoall, world, timeout=120)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", WORLDS)
def test_autograd_of_each_collective(world):
    ranks(hw.autograd, world, timeout=120)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", WORLDS)
def test_sparse_objects_parameters_optimizer_state(world):
    ranks(hw.sparse_and_objects, world, timeout=120)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 3])
def test_process_sets(world):
    ranks(hw.process_sets, world, timeout=120)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("opt, compression, passes, op", [
    ("sgd", "none", 1, "avg"), ("adam", "none", 1, "avg"), ("sgd", "none", 2, "avg"), ("sgd", "none", 1, "sum"),
    ("sgd", "fp16", 1, "avg"),
])
def test_distributed_optimizer_matches_one_process(world, opt, compression, passes, op):
    # fp16: force the half-precision wire on one host (it sends float32 there otherwise)
    env = {"DTRAIN_SHM_COMPRESSION": "1"} if compression == "fp16" else None
    diffs = ranks(hw.optimizer_parity, world, opt, compression, passes, op, env=env, timeout=240)
    tol = FP16_TOL if compression == "fp16" else FP32_TOL
    assert max(diffs) <= tol, diffs
    if compression == "fp16":
        assert max(diffs) > 0, "the fp16 wire should round something"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", WORLDS)
def test_optimizer_rules(world):
    ranks(hw.optimizer_rules, world, timeout=120)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", WORLDS)
def test_join_with_uneven_steps(world):
    out = ranks(hw.join_uneven, world, timeout=120)
    assert [last for _, last in out] == [world - 1] * world


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", WORLDS)
def test_sync_batch_norm_matches_batch_norm_on_the_whole_batch(world):
    ranks(hw.sync_batch_norm, world, timeout=120)


@pytest.mark.timeout(120)
def test_timeline(tmp_path):
    path = str(tmp_path / "hvd.json")
    ranks(hw.timeline_file, 2, path, timeout=90)
    with open(path) as f:
        assert json.load(f)["traceEvents"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, types, words", [
    ("shape", "HorovodInternalError", "mismatched"),
    ("same-count-shape", "HorovodInternalError", "shape"),
    ("dtype", "HorovodInternalError", "mismatched"),
    ("root", "HorovodInternalError", "root"),
    ("gather-shape", "HorovodInternalError", "mismatched shapes"),
    ("bcast-shape", "HorovodInternalError", "mismatched broadcast tensors"),
])
def test_mismatches_raise_horovod_internal_error_on_every_rank(kind, types, words):
    out = ranks(hw.bad_call, 2, kind, timeout=90)
    for mro, msg in out:
        assert types in mro and "RuntimeError" in mro, (mro, msg)
        assert words in msg, msg


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, types, words", [
    ("root-range", "ValueError", "out of range"),
    ("duplicate-name", "ValueError", "still being processed"),
    ("adasum", "NotImplementedError", "Adasum"),
    ("splits", "ValueError", "splits"),
])
def test_bad_arguments_raise_value_errors(kind, types, words):
    for mro, msg in ranks(hw.bad_call, 2, kind, timeout=90):
        assert types in mro, (mro, msg)
        assert words in msg, msg


EXAMPLE = f"{REPO}/examples/horovod_digits.py"


@pytest.mark.timeout(300)
def test_example_under_dtrain_run(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", "-np", "2", EXAMPLE, "--epochs", "5"],
                       capture_output=True, text=True, timeout=280, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test accuracy" in p.stdout, p.stdout
    acc = float(p.stdout.split("test accuracy")[-1].split("%")[0].strip(": "))
    assert acc > 85, p.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["native", "mpi"])  # mpi: every collective through mpi4py
def test_example_under_mpirun(tmp_path, backend):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed")
    pytest.importorskip("mpi4py")
    p = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PYTHONPATH",
                        "-x", "DTRAIN_BACKEND", sys.executable, EXAMPLE, "--epochs", "1"],
                       capture_output=True, text=True, timeout=280, cwd=str(tmp_path),
                       env={**__import__("os").environ, "PYTHONPATH": REPO, "OMPI_MCA_btl": "tcp,self",
                            "OMPI_MCA_rtc_hwloc_vmhole": "none", "DTRAIN_BACKEND": backend})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test accuracy" in p.stdout, p.stdout


@pytest.mark.timeout(120)
def test_horovodrun_timeline_flag(tmp_path):
    rc, out, err, _ = script(tmp_path, """
        import torch, dtrain.horovod as hvd
        if __name__ == "__main__":
            hvd.init()
            hvd.allreduce(torch.ones(3), name="flagged")
            hvd.shutdown()
        """, 2, "--timeline-filename", str(tmp_path / "t.json"))
    assert rc == 0, out + err
    with open(tmp_path / "t.json") as f:
        assert any(e.get("name") == "allreduce flagged" for e in json.load(f)["traceEvents"])
