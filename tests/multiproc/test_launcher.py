"""dtrain-run: prefixes, exit codes, stopping the others, commands and modules; dtrain.launch.run."""

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
def test_launch_run_returns_each_rank_result_and_reports_tracebacks():
    assert dtrain.launch.run(workers.env_flag, nprocs=3, args=("DTRAIN_RANK",), timeout=50) == ["0", "1", "2"]
    with pytest.raises(dtrain.launch.RankFailed) as info:
        dtrain.launch.run(int, nprocs=2, args=("not a number",), timeout=50)
    assert "ValueError" in str(info.value) and "Traceback" in str(info.value)
