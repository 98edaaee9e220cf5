"""Under real mpirun (Open MPI here): ranks started by mpirun alone bootstrap over MPI
(mpi4py) and run dtrain's collectives; `dtrain-run --mpi` builds that command line (and
prints it with --dry-run). Skips without mpirun or mpi4py."""

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from dtrain.launch import mpi
from tests.multiproc.harness import REPO

MPIRUN = shutil.which("mpirun")
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
real = pytest.mark.skipif(not (MPIRUN and HAVE_MPI4PY), reason="needs mpirun (openmpi-bin) and mpi4py")

_JOB = textwrap.dedent("""
    import os, sys, torch, dtrain
    dtrain.init(timeout=30)
    r, n = dtrain.rank(), dtrain.world_size()
    assert os.environ.get("OMPI_COMM_WORLD_RANK") == str(r), "the rank must be mpirun's"
    for count in (0, 1, 7, 100003):
        t = torch.arange(count, dtype=torch.float64) + r
        dtrain.allreduce(t)
        assert torch.equal(t, torch.arange(count, dtype=torch.float64) * n + sum(range(n))), count
    b = torch.full((3,), float(r)); dtrain.broadcast(b, root=n - 1)
    g = dtrain.allgather(torch.full((r + 1,), float(r)))
    assert b.tolist() == [n - 1.0] * 3 and g.tolist() == [float(k) for k in range(n) for _ in range(k + 1)]
    print(f"ok rank {r} of {n} local {dtrain.local_rank()}", flush=True)
    dtrain.shutdown()
""")


def _env():
    e = dict(os.environ, PYTHONPATH=REPO)
    for k in [k for k in e if k.startswith(("DTRAIN_", "OMPI_", "PMI_")) or k in ("RANK", "WORLD_SIZE")]:
        e.pop(k)
    return e


@real
@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_plain_mpirun_runs_a_dtrain_script(tmp_path, n):
    """`mpirun -np n python job.py`, no dtrain launcher and no MASTER_ADDR: rank 0 publishes
    its address over MPI."""
    job = tmp_path / "job.py"
    job.write_text(_JOB)
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    p = subprocess.run([MPIRUN, "-np", str(n), *root, "--oversubscribe", "--bind-to", "none", "-x", "PYTHONPATH",
                        sys.executable, str(job)], capture_output=True, text=True, timeout=100, env=_env())
    assert p.returncode == 0, p.stdout + p.stderr
    for r in range(n):
        assert f"ok rank {r} of {n} local {r}" in p.stdout, p.stdout


@real
@pytest.mark.timeout(120)
def test_dtrain_run_mpi_runs_the_job(tmp_path):
    job = tmp_path / "job.py"
    job.write_text(_JOB)
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", "--mpi", "-n", "3", str(job)], capture_output=True,
                       text=True, timeout=100, env=_env(), cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    for r in range(3):
        assert f"[1,{r}]<stdout>:ok rank {r} of 3 local {r}" in p.stdout, p.stdout


@real
@pytest.mark.timeout(120)
def test_a_failed_rank_ends_the_mpirun_job(tmp_path):
    """Rank 1 raises mid-training. Its process lives on in mpi4py's MPI_Finalize (which waits
    for every rank), so only the abort dtrain sends from its excepthook can end the others
    quickly; they raise a CommError naming rank 1, and mpirun exits non-zero."""
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent("""
        import sys, time, torch, dtrain
        dtrain.init(timeout=30)
        t = torch.ones(100)
        for step in range(100000):
            dtrain.allreduce(t)
            if step == 10 and dtrain.rank() == 1:
                raise RuntimeError("boom on purpose")
            time.sleep(0.01)
    """))
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", "--mpi", "-n", "3", str(job)], capture_output=True,
                       text=True, timeout=100, env=_env(), cwd=str(tmp_path))
    assert p.returncode != 0
    assert time.monotonic() - start < 20, p.stdout + p.stderr
    assert "rank 1 stopped with an uncaught RuntimeError: boom on purpose" in p.stderr, p.stderr


@pytest.mark.parametrize("root", [True, False])
def test_open_mpi_command_line(monkeypatch, root):
    monkeypatch.setenv("DTRAIN_SHM_BYTES", "1048576")
    monkeypatch.setenv("DTRAIN_STORE_FD", "7")  # a launcher's own: never forwarded
    monkeypatch.setenv("MY_SETTING", "1")
    cmd = mpi.command("openmpi", "mpirun", 8, ["python", "train.py"], hosts="a:4,b:4", forward=["MY_SETTING"],
                      as_root=root)
    assert cmd[:3] == ["mpirun", "-np", "8"] and cmd[-2:] == ["python", "train.py"]
    assert ("--allow-run-as-root" in cmd) == root
    assert cmd[cmd.index("-H") + 1] == "a:4,b:4" and "--oversubscribe" not in cmd
    assert cmd[cmd.index("--bind-to") + 1] == "none"
    sent = [cmd[i + 1] for i, w in enumerate(cmd) if w == "-x"]
    assert {"DTRAIN_JOB_TOKEN", "DTRAIN_SHM_BYTES", "MY_SETTING"} <= set(sent) and "DTRAIN_STORE_FD" not in sent


def test_mpich_command_line(monkeypatch):
    monkeypatch.setenv("MY_SETTING", "1")
    cmd = mpi.command("mpich", "mpiexec", 4, ["python", "train.py"], hostfile="hosts", forward=["MY_SETTING"])
    assert cmd[:3] == ["mpiexec", "-n", "4"] and cmd[cmd.index("-f") + 1] == "hosts"
    assert "--allow-run-as-root" not in cmd  # Hydra has no such flag
    names = cmd[cmd.index("-genvlist") + 1].split(",")
    assert "DTRAIN_JOB_TOKEN" in names and "MY_SETTING" in names


def test_dry_run_prints_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", "--mpi", "--mpi-flavor", "mpich", "--dry-run",
                        "-H", "a:2,b:1", sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
                       capture_output=True, text=True, timeout=30, env=_env())
    assert p.returncode == 0, p.stderr
    words = shlex.split(p.stdout)
    assert words[:3] == ["mpirun", "-n", "3"] and "-hosts" in words  # every slot of -H
    assert not marker.exists()


@pytest.mark.parametrize("args, match", [
    (["--mpi-flavor", "lam"], "invalid choice"),
    (["--dry-run"], "--dry-run goes with --mpi"),
    (["--mpi", "--max-restarts", "1"], "--max-restarts restarts ranks dtrain-run starts itself"),
])
def test_bad_mpi_flags_are_named(args, match):
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", *args, sys.executable, "-c", "pass"],
                       capture_output=True, text=True, timeout=30, env=_env())
    assert p.returncode != 0 and match in p.stderr, p.stderr


@real
@pytest.mark.timeout(180)
def test_dtrain_run_mpi_across_test_bed_hosts(tmp_path):
    """`dtrain-run --mpi -H h0:2,h1:2 --remote-shell AGENT --network-interface eth0`, run on
    host 0: mpirun starts its daemon on host 1 through the agent (plm_rsh_agent), rank 0
    publishes eth0's address over MPI, ranks share memory within a host and talk TCP across."""
    from dtrain.testing import cluster as tb
    if tb.available() is not None:
        pytest.skip(str(tb.available()))
    agent = tb.remote_shell_agent(tmp_path)
    job = tmp_path / "job.py"
    job.write_text(_JOB.replace("dtrain.shutdown()", textwrap.dedent("""
        world = dtrain.comm.group.current().world
        # one string per print: mpirun --tag-output tags every write it gets
        print(f"peers {r} {[world.transport_to(j) for j in range(n) if j != r]}", flush=True)
        dtrain.shutdown()""")))
    # Open MPI's shared-memory BTL (vader) crashes between processes in a network namespace:
    # its own traffic goes over TCP here (dtrain's does not use MPI's at all).
    # Its daemon on host 1 also segfaults now and then while writing the hwloc topology into a
    # shared-memory hole (hwloc_shmem_topology_write): vmhole=none skips that sharing.
    env = dict(_env(), OMPI_MCA_btl="tcp,self", OMPI_MCA_rtc_hwloc_vmhole="none")
    with tb.Cluster(2) as c:
        hosts = ",".join(f"{h.netns}:2" for h in c.hosts)
        p = c.run(0, [sys.executable, "-m", "dtrain.launch", "--mpi", "-H", hosts, "--remote-shell", str(agent),
                      "--network-interface", c.hosts[0].ifname, str(job)], timeout=150, env=env, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    for r in range(4):
        assert f"ok rank {r} of 4 local {r % 2}" in p.stdout, p.stdout
        peers = ["shm" if j // 2 == r // 2 else "tcp" for j in range(4) if j != r]
        assert f"peers {r} {peers}" in p.stdout, p.stdout


def test_remote_shell_and_interface_reach_mpirun():
    cmd = mpi.command("openmpi", "mpirun", 4, ["python", "t.py"], hosts="a:2,b:2", remote_shell="/x/agent",
                      interface="eth1", as_root=False)
    assert cmd[cmd.index("plm_rsh_agent") + 1] == "/x/agent"
    assert cmd[cmd.index("btl_tcp_if_include") + 1] == "eth1" and cmd[cmd.index("oob_tcp_if_include") + 1] == "eth1"
    cmd = mpi.command("mpich", "mpiexec", 4, ["python", "t.py"], hosts="a:2,b:2", remote_shell="/x/agent",
                      interface="eth1")
    assert cmd[cmd.index("-launcher-exec") + 1] == "/x/agent" and cmd[cmd.index("-iface") + 1] == "eth1"


# ------------------------------------------------------------ backend="mpi"

def _mpirun(n, argv, env_extra=None, timeout=150):
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    env = dict(_env(), **(env_extra or {}))
    xs = [w for k in (env_extra or {}) for w in ("-x", k)]
    return subprocess.run([MPIRUN, "-np", str(n), *root, "--oversubscribe", "--bind-to", "none", "-x", "PYTHONPATH",
                           *xs, *argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@real
@pytest.mark.timeout(180)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_every_collective_through_the_mpi_backend(n):
    """float32/64, float16, bfloat16 and int64 at sizes 0, 1, 7 and 100003; avg (async), max,
    broadcast, uneven allgather, reduce_scatter, alltoall, send/recv, a sub-group, barrier."""
    p = _mpirun(n, [sys.executable, os.path.join(REPO, "tests", "multiproc", "mpi_backend_job.py")])
    assert p.returncode == 0, p.stdout + p.stderr
    for r in range(n):
        assert f"ok rank {r} of {n} local {r} transport mpi" in p.stdout, p.stdout


@real
@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", [2, 3])
def test_allreduce_strategy_parity_over_mpi(n):
    """AllReduceStrategy with DTRAIN_BACKEND=mpi trains like one process on the whole batch
    (the same bound as the native backend's parity test: 2e-6 after 20 steps)."""
    code = ("from tests.multiproc import strategy_workers as sw\n"
            "import os, dtrain\n"
            "for opt in ('sgd', 'adam'):\n"
            "    diff, unused_none = sw.parity(opt, None, False, 20, 0.01)[:2]\n"
            "    line = f'parity {opt} {dtrain.rank()} {diff} {unused_none} {dtrain.comm.group.current().backend}\\n'\n"
            "    os.write(1, line.encode())  # one write: the ranks share mpirun's stdout\n")
    p = _mpirun(n, [sys.executable, "-c", code], {"DTRAIN_BACKEND": "mpi"})
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("parity")]
    assert len(rows) == 2 * n, p.stdout
    for _, opt, rank, diff, unused_none, backend in rows:
        assert backend == "mpi" and unused_none == "True"
        assert float(diff) <= 2e-6, f"{opt} on rank {rank} is {diff} from one process"


def test_mpi_backend_outside_mpirun_is_refused():
    p = subprocess.run([sys.executable, "-c", "import dtrain; dtrain.init(backend='mpi')"], capture_output=True,
                       text=True, timeout=60, env=_env())
    assert p.returncode != 0 and "backend='mpi' runs under mpirun" in p.stderr, p.stderr
