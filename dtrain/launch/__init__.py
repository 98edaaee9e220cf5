"""Launching: the dtrain-run command (cli.py) and dtrain.launch.run(fn, nprocs) (spawn.py)."""

from dtrain.launch.local import RankFailed
from dtrain.launch.spawn import run

__all__ = ["RankFailed", "run"]
