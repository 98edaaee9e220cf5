"""Running real ranks from tests: functions through dtrain.launch.run, scripts through dtrain-run.

Every run has a timeout; a failed rank's traceback is in the raised RankFailed message.
"""

import os
import subprocess
import sys
import textwrap
import time

import dtrain.launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ranks(fn, n, *args, env=None, timeout=180, start_method="forkserver"):
    """fn(*args) on n ranks; returns their results. The ranks fork from one server that has
    imported torch (dtrain.launch.run's start_method), so the suite pays torch's import once
    instead of once a rank; test_launcher covers "spawn"."""
    return dtrain.launch.run(fn, nprocs=n, args=args, timeout=timeout, env=env, start_method=start_method)


def script(tmp_path, body, n, *launcher_args, env=None, timeout=120):
    """Runs `body` (Python source) with dtrain-run on n ranks. Returns (rc, stdout, stderr, seconds)."""
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    cmd = [sys.executable, "-m", "dtrain.launch", "-n", str(n), *launcher_args, str(path)]
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    start = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=str(tmp_path))
    return p.returncode, p.stdout, p.stderr, time.monotonic() - start
