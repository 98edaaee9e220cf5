"""dtrain-run: prefixes, exit codes, stopping the others, commands and modules; dtrain.launch.run."""

import functools
import os
import signal
import subprocess
import sys
import time

import pytest

import dtrain.launch
from tests.multiproc import workers
from tests.multiproc.harness import REPO, script


@pytest.mark.timeout(60)
def test_output_is_prefixed_with_the_rank(tmp_path):
    rc, out, err, _ = script(tmp_path, """
import os, sys
print("hello from", os.environ["DTRAIN_RANK"])
print("to stderr", os.environ["DTRAIN_RANK"], file=sys.stderr)
""", 3)
    assert rc == 0
    for r in range(3):
        assert f"[{r}] hello from {r}" in out.splitlines()
        assert f"[{r}] to stderr {r}" in err.splitlines()


@pytest.mark.timeout(60)
def test_failed_rank_stops_the_rest_and_sets_the_exit_code(tmp_path):
    rc, out, err, secs = script(tmp_path, """
import os, sys, time
if os.environ["DTRAIN_RANK"] == "1":
    print("about to fail")
    sys.exit(7)
time.sleep(60)
""", 3, "--grace", "2")
    assert rc == 7
    assert secs < 15
    assert "rank 1 failed (exit code 7)" in err
    assert "[1] about to fail" in err  # its last lines are shown


@pytest.mark.timeout(60)
def test_command_and_module_modes(tmp_path):
    (tmp_path / "mod_x.py").write_text("import os\nprint('module rank', os.environ['DTRAIN_RANK'])\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + REPO)
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", "-n", "2", "-m", "mod_x"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0 and "[1] module rank 1" in p.stdout
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", "-n", "2", sys.executable, "-c",
                        "import os; print('cmd', os.environ['DTRAIN_WORLD_SIZE'])"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0 and p.stdout.count("cmd 2") == 2
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", "-n", "2", "/nonexistent/prog"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode != 0 and "could not start" in p.stderr


@pytest.mark.timeout(60)
def test_ctrl_c_stops_every_rank(tmp_path):
    path = tmp_path / "sleepy.py"
    path.write_text("import os, time\nprint('up', os.environ['DTRAIN_RANK'], flush=True)\ntime.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.Popen([sys.executable, "-m", "dtrain.launch", "-n", "2", "--grace", "2", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = 0
    while seen < 2:
        if "up" in p.stdout.readline():
            seen += 1
    start = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 128 + signal.SIGINT
    assert time.monotonic() - start < 10
    assert "stopping all ranks" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_launch_run_returns_each_rank_result_and_reports_tracebacks(start_method, monkeypatch):
    run = functools.partial(dtrain.launch.run, timeout=50, start_method=start_method)
    assert run(workers.env_flag, nprocs=3, args=("DTRAIN_RANK",)) == ["0", "1", "2"]
    with pytest.raises(dtrain.launch.RankFailed) as info:
        run(int, nprocs=2, args=("not a number",))
    assert "ValueError" in str(info.value) and "Traceback" in str(info.value)
    # The environment at each call reaches the ranks, also from a fork server started earlier.
    monkeypatch.setenv("DTRAIN_TEST_FLAG", "set after the first run")
    assert run(workers.env_flag, nprocs=2, args=("DTRAIN_TEST_FLAG",)) == ["set after the first run"] * 2
    assert run(workers.env_flag, nprocs=1, args=("DTRAIN_TEST_FLAG",), env={"DTRAIN_TEST_FLAG": "x"}) == ["x"]


def test_launch_run_names_a_bad_start_method():
    with pytest.raises(ValueError, match=r"start_method='fork' is not one of \('spawn', 'forkserver'\)"):
        dtrain.launch.run(workers.env_flag, nprocs=1, args=("X",), start_method="fork")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"], "--node-rank 2 is outside 0..1"),
    (["--nnodes", "2", "--node-rank", "1"], "--nnodes > 1 needs --master-addr"),
    (["--nnodes", "0", "--master-addr", "127.0.0.1"], "--nnodes must be at least 1"),
    (["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", "70000"], "--master-port 70000 is not"),
])
def test_bad_node_flags_are_named(args, message):
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", *args, "-n", "1", sys.executable, "-c", "pass"],
                       capture_output=True, text=True, timeout=30, cwd=REPO)
    assert p.returncode != 0 and message in p.stderr, p.stderr


@pytest.mark.timeout(60)
def test_node_zero_names_a_master_port_in_use(tmp_path):
    import socket
    busy = socket.create_server(("", 0))
    port = busy.getsockname()[1]
    try:
        p = subprocess.run([sys.executable, "-m", "dtrain.launch", "--nnodes", "2", "--master-addr", "127.0.0.1",
                            "--master-port", str(port), "-n", "1", sys.executable, "-c", "pass"],
                           capture_output=True, text=True, timeout=30, cwd=REPO)
    finally:
        busy.close()
    assert p.returncode != 0 and f"could not listen on *:{port}" in p.stderr and "--master-port" in p.stderr, p.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("per_node", [1, 2])
def test_two_node_launchers_on_one_host_form_one_world(tmp_path, per_node):
    """Two `--nnodes 2` launchers on this machine: global ranks by node, local ranks within it,
    one host id per node (so the nodes talk TCP), and the sums over all four ranks are right."""
    job = tmp_path / "job.py"
    job.write_text(
        "import os, torch, dtrain\n"
        "dtrain.init(timeout=30)\n"
        "t = torch.full((7,), float(dtrain.rank() + 1)); dtrain.allreduce(t)\n"
        "world = dtrain.comm.group.current().world\n"
        "peers = sorted(world.transport_to(j) for j in range(dtrain.world_size()) if j != dtrain.rank())\n"
        "print('rank', dtrain.rank(), 'local', os.environ['LOCAL_RANK'], 'host', os.environ['DTRAIN_HOST_ID'],\n"
        "      'sum', t.tolist() == [float(sum(range(1, dtrain.world_size() + 1)))] * 7, 'peers', peers, flush=True)\n")
    port = str(20000 + os.getpid() % 20000)
    env = dict(os.environ, DTRAIN_JOB_TOKEN="t0k3n")
    env.pop("DTRAIN_HOST_ID", None)
    procs = [subprocess.Popen([sys.executable, "-m", "dtrain.launch", "--nnodes", "2", "--node-rank", str(k),
                               "--master-addr", "127.0.0.1", "--master-port", port, "-n", str(per_node), str(job)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for k in (1, 0)]  # node 1 first: its ranks wait for node 0's rendezvous
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    text = outs[0][0] + outs[1][0]
    n = 2 * per_node
    for r in range(n):
        node, local = divmod(r, per_node)
        peers = sorted(["shm"] * (per_node - 1) + ["tcp"] * per_node)
        assert f"[node{node}:{r}] rank {r} local {local} host node{node} sum True peers {peers}" in text, text


_RESUMABLE = """
import hashlib, os, sys, torch, dtrain
torch.manual_seed(0)
strategy = dtrain.AllReduceStrategy()
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
model, opt = strategy.prepare(model, opt)
ckpt, start = sys.argv[1], 0
attempt = os.environ["DTRAIN_RESTART_COUNT"]
if os.path.exists(ckpt):
    start = strategy.load(ckpt, model=model, optimizer=opt)["step"] + 1
print("attempt", attempt, "starts at step", start, flush=True)
for step in range(start, 12):
    g = torch.Generator().manual_seed(step * 10 + strategy.rank)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    strategy.save(ckpt, model=model, optimizer=opt, step=step)
    if sys.argv[2] == "crash" and attempt == "0" and step == 5 and strategy.rank == 1:
        os._exit(3)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print("final", digest, flush=True)
"""


@pytest.mark.timeout(180)
def test_max_restarts_resumes_from_the_checkpoint(tmp_path):
    """Rank 1 dies after step 5's checkpoint; --max-restarts 1 starts both ranks again, they
    resume at step 6, and the final parameters equal an uninterrupted run's, bit for bit."""
    job = tmp_path / "job.py"
    job.write_text(_RESUMABLE)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {}
    for mode, restarts in (("crash", "1"), ("clean", "0")):
        ckpt = tmp_path / f"{mode}.pt"
        p = subprocess.run([sys.executable, "-m", "dtrain.launch", "-n", "2", "--max-restarts", restarts, "--grace",
                            "2", str(job), str(ckpt), mode], capture_output=True, text=True, timeout=150, env=env,
                           cwd=str(tmp_path))
        assert p.returncode == 0, p.stdout + p.stderr
        runs[mode] = p
    crash = runs["crash"]
    assert "rank 1 failed (exit code 3)" in crash.stderr and "restart 1 of 1" in crash.stderr, crash.stderr
    assert "[0] attempt 1 starts at step 6" in crash.stdout, crash.stdout
    final = {m: {line.split()[-1] for line in p.stdout.splitlines() if " final " in line} for m, p in runs.items()}
    assert len(final["crash"]) == 1 and final["crash"] == final["clean"], final


@pytest.mark.timeout(60)
def test_restarts_stop_when_used_up(tmp_path):
    rc, out, err, _ = script(tmp_path, """
import os, sys
print("attempt", os.environ["DTRAIN_RESTART_COUNT"])
sys.exit(5)
""", 2, "--max-restarts", "2", "--grace", "1")
    assert rc == 5
    assert [f"[0] attempt {k}" in out for k in range(3)] == [True] * 3 and "attempt 3" not in out
    assert err.count("starting all ranks again") == 2
