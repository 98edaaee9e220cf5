"""backend="torch": dtrain's collectives and AllReduceStrategy through torch.distributed (gloo),
started by dtrain-run on real processes."""

import os
import sys

import pytest

from tests.multiproc.harness import REPO, script


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_every_collective_through_gloo(tmp_path, n):
    job = os.path.join(REPO, "tests", "multiproc", "torch_backend_job.py")
    rc, out, err, _ = script(tmp_path, open(job).read(), n, env={"PYTHONPATH": REPO})
    assert rc == 0, out + err
    for r in range(n):
        assert f"ok rank {r} of {n}" in out, out + err


@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [2, 3])
def test_allreduce_strategy_parity_over_torch(tmp_path, n):
    """AllReduceStrategy with DTRAIN_BACKEND=torch trains like one process on the whole batch
    (the native backend's bound: 2e-6 after 20 steps)."""
    rc, out, err, _ = script(tmp_path, """
        from tests.multiproc import strategy_workers as sw
        import dtrain
        for opt in ('sgd', 'adam'):
            diff, unused_none = sw.parity(opt, None, False, 20, 0.01)[:2]
            print('parity', opt, dtrain.rank(), diff, unused_none, dtrain.comm.group.current().backend, flush=True)
    """, n, env={"DTRAIN_BACKEND": "torch", "PYTHONPATH": REPO})
    assert rc == 0, out + err
    rows = [line.split()[1:] for line in out.splitlines() if "] parity " in line]
    assert len(rows) == 2 * n, out
    for _, opt, rank, diff, unused_none, backend in rows:
        assert backend == "torch" and unused_none == "True"
        assert float(diff) <= 2e-6, f"{opt} on rank {rank} is {diff} from one process"


@pytest.mark.timeout(60)
def test_a_dead_rank_is_named_through_the_store(tmp_path):
    """A rank that raises aborts (posting why to the store); the others fail on the closed
    connections and say which rank stopped and why, within seconds."""
    rc, out, err, secs = script(tmp_path, """
        import time, torch, dtrain
        dtrain.init(backend="torch", timeout=30)
        dtrain.allreduce(torch.ones(10))
        start = time.monotonic()
        if dtrain.rank() == 1:
            time.sleep(0.5)  # the others are waiting for it in the allreduce below
            raise ValueError("bad batch 17")
        try:
            dtrain.allreduce(torch.ones(1 << 20))
            print("NO ERROR")
        except dtrain.CommError as e:
            print(f"CAUGHT after {time.monotonic() - start:.1f}s: {e}", flush=True)
    """, 3, "--grace", "5")
    assert rc != 0
    assert "NO ERROR" not in out
    caught = [line for line in out.splitlines() if "CAUGHT" in line]
    assert caught, out + err
    assert any("rank 1 stopped with an uncaught ValueError: bad batch 17" in line for line in caught), caught
    assert all(float(line.split("after ")[1].split("s:")[0]) < 10 for line in caught), caught


def test_nccl_is_refused_with_the_reason(tmp_path):
    rc, out, err, _ = script(tmp_path, "import dtrain; dtrain.init(backend='torch')\n", 1,
                             env={"DTRAIN_TORCH_BACKEND": "nccl"})
    assert rc != 0 and "runs gloo only in this build" in err, err


def test_unknown_backend_names_the_choices():
    import subprocess
    p = subprocess.run([sys.executable, "-c", "import dtrain; dtrain.init(backend='nccl')"], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
    assert p.returncode != 0 and "native, mpi, torch" in p.stderr, p.stderr
