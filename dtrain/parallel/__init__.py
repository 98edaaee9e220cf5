"""Strategies: one shape (prepare / distribute / save / load) for every way of training."""

from dtrain.parallel import tensor
from dtrain.parallel.data_parallel import AllReduceStrategy
from dtrain.parallel.mesh import Mesh
from dtrain.parallel.param_server import ParameterServerStrategy
from dtrain.parallel.pipeline import PipelineStrategy
from dtrain.parallel.sharding import ShardedSampler
from dtrain.parallel.strategy import LocalStrategy, Strategy

__all__ = ["AllReduceStrategy", "Mesh", "tensor", "ParameterServerStrategy", "PipelineStrategy", "LocalStrategy", "ShardedSampler", "Strategy"]
