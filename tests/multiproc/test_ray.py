"""dtrain.ray.run and dtrain-run --ray on a real local Ray instance (skipped without Ray).

No namespaces here: Ray's head and raylets bind in the root namespace, so the Ray tests
run on a local single-node cluster (ranks on one node share memory)."""

import os
import subprocess
import sys
import time

import pytest

from tests.multiproc.harness import REPO

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray>=2.9')")

import dtrain.ray  # noqa: E402
from dtrain.errors import ConfigError  # noqa: E402
from dtrain.launch.local import RankFailed  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    yield
    ray.shutdown()


def allreduce_rank(scale):
    import torch

    import dtrain
    dtrain.init(timeout=30)
    r, n = dtrain.rank(), dtrain.world_size()
    t = torch.full((7,), float(r + 1) * scale)
    dtrain.allreduce(t)
    world = dtrain.comm.group.current().world
    return {"rank": r, "world": n, "local": (dtrain.local_rank(), dtrain.local_size()), "sum": t.tolist(),
            "transports": sorted({world.transport_to(j) for j in range(n) if j != r})}


def fail_on_rank_one(how):
    import torch

    import dtrain
    dtrain.init(timeout=30)
    if dtrain.rank() == 1:
        if how == "raise":
            raise ValueError("broken on purpose")
        os._exit(9)  # the actor process dies
    t = torch.ones(3)
    for _ in range(1000):
        dtrain.allreduce(t)
        time.sleep(0.01)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_run_returns_rank_zeros_result(cluster, n):
    out = dtrain.ray.run(allreduce_rank, num_workers=n, args=(2.0,))
    assert out["rank"] == 0 and out["world"] == n and out["local"] == (0, n)
    assert out["sum"] == [2.0 * n * (n + 1) / 2] * 7
    assert out["transports"] == (["shm"] if n > 1 else [])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["raise", "die"])
def test_a_failed_rank_is_named(cluster, how):
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        dtrain.ray.run(fail_on_rank_one, num_workers=3, args=(how,))
    assert info.value.rank == 1
    if how == "raise":
        assert "ValueError: broken on purpose" in str(info.value)  # the rank's traceback
    assert time.monotonic() - start < 30


@pytest.mark.timeout(120)
def test_bad_requests_are_named(cluster):
    with pytest.raises(ConfigError, match="num_workers must be a positive integer"):
        dtrain.ray.run(allreduce_rank, num_workers=0)
    with pytest.raises(ConfigError, match="placement 'WIDE'"):
        dtrain.ray.run(allreduce_rank, num_workers=1, placement="WIDE")
    with pytest.raises(ConfigError, match=r"could not place 2 workers of \{'CPU': 3\}"):
        dtrain.ray.run(allreduce_rank, num_workers=2, resources_per_worker={"CPU": 3}, timeout=5)


@pytest.mark.timeout(180)
def test_dtrain_run_ray_runs_a_script(tmp_path):
    job = tmp_path / "job.py"
    job.write_text("import torch, dtrain\ndtrain.init(timeout=30)\nt = torch.ones(4) * (dtrain.rank() + 1)\n"
                   "dtrain.allreduce(t)\nprint('rank', dtrain.rank(), 'of', dtrain.world_size(), 'sum', t[0].item(),"
                   " flush=True)\n")
    env = dict(os.environ, PYTHONPATH=REPO, RAY_DEDUP_LOGS="0")
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", "--ray", "local", "-n", "2", str(job)],
                       capture_output=True, text=True, timeout=150, env=env, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    text = p.stdout + p.stderr  # Ray forwards actor output to the driver's stdout or stderr
    for r in range(2):
        assert f"dtrain-rank{r}" in text and f"rank {r} of 2 sum 3.0" in text, text
