"""dtrain-bench: every name it lists runs a script that exists, and arguments reach it."""

import os
import subprocess
import sys

from dtrain import bench
from tests.multiproc.harness import REPO


def test_every_benchmark_it_names_exists():
    where = bench.folder()
    assert where == os.path.join(REPO, "benchmarks")
    for name, (script, what) in bench.BENCHMARKS.items():
        assert os.path.isfile(os.path.join(where, script)), name
        assert name in bench.usage() and what in bench.usage()


def test_arguments_reach_the_script_and_errors_name_the_choices():
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "dtrain.bench", "pipeline", "--help"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0 and "--quick" in p.stdout and "bubble" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "dtrain.bench", "scalng"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 2 and "no benchmark named 'scalng'" in p.stderr and "scaling" in p.stderr
