"""Two-dimensional layouts: the world cut into model-parallel groups (pipeline stages or
tensor-parallel ranks, consecutive ranks, so they share a host when they can) and the
data-parallel groups across them (the replicas of the same model part)."""

from __future__ import annotations

import dtrain
from dtrain.errors import ConfigError


class Mesh:
    """The groups of a (data x model) layout of the world.

    Args:
        model: ranks per model replica (pipeline stages, or tensor-parallel ranks); must divide
            the world size. Every rank must build the same Mesh at the same point (it calls
            dtrain.new_group for every group, as torch.distributed.new_group needs too).

    Attributes:
        model: this rank's model-parallel group (ranks r - r % model ... + model - 1).
        data: this rank's data-parallel group (the ranks holding the same model part).
        model_rank, data_rank: this rank's place in each.

    Example (4 ranks, Mesh(model=2))::

        rank:         0  1  2  3
        model group:  [0, 1]  [2, 3]         model_rank: 0 1 0 1
        data group:   [0, 2]  [1, 3]         data_rank:  0 0 1 1
    """

    def __init__(self, model: int):
        if not dtrain.is_initialized():
            dtrain.init()
        world = dtrain.world_size()
        if not isinstance(model, int) or model < 1 or world % model:
            raise ConfigError(f"Mesh(model={model!r}) needs a positive divisor of the world size {world}: the world is "
                              "cut into replicas of `model` consecutive ranks")
        me = dtrain.rank()
        self.model_size, self.data_size = model, world // model
        models = [dtrain.new_group(list(range(i * model, (i + 1) * model))) for i in range(self.data_size)]
        datas = [dtrain.new_group(list(range(j, world, model))) for j in range(model)]
        self.model = models[me // model]
        self.data = datas[me % model]
        self.model_rank, self.data_rank = me % model, me // model

    def __repr__(self) -> str:
        return (f"Mesh(data={self.data_size} x model={self.model_size}; rank {dtrain.rank()}: model rank "
                f"{self.model_rank} of {self.model.ranks}, data rank {self.data_rank} of {self.data.ranks})")
