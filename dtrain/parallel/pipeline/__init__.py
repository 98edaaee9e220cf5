"""Pipeline parallelism: micro-batching (microbatch.py), stages and their transfers (stage.py,
p2p.py, partition.py) and schedules (schedules.py), kept apart so a new schedule touches
neither of the others; PipelineStrategy (strategy.py) puts them together."""

from dtrain.parallel.pipeline.schedules import SCHEDULES, GPipe, OneFOneB, Schedule
from dtrain.parallel.pipeline.strategy import PipelineStrategy

__all__ = ["PipelineStrategy", "Schedule", "GPipe", "OneFOneB", "SCHEDULES"]
