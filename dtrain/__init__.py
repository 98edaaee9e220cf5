"""dtrain: distributed training for PyTorch.

    import dtrain
    dtrain.init()
    dtrain.allreduce(tensor, op="avg")

The names below load on first use (PEP 562), so `import dtrain` and the launcher
(`dtrain-run`, which only starts processes) do not pay torch's ~1.2 s import; the first
touch of dtrain.init, dtrain.AllReduceStrategy, dtrain.ops and the like imports it.
"""

import importlib
import pkgutil
from typing import Any

from dtrain import errors  # noqa: F401  (first: the C++ module maps its errors onto these classes)
from dtrain.errors import CommError, CommTimeout, ConfigError, DataError, DtrainError, RendezvousError

__version__ = "0.1.0"

_COMM = ("Group", "Work", "allgather", "allreduce", "alltoall", "barrier", "broadcast", "init",
         "is_initialized", "local_rank", "local_size", "new_group", "rank", "recv", "reduce_scatter",
         "send", "sendrecv", "shutdown", "world_size")
_PARALLEL = ("AllReduceStrategy", "LocalStrategy", "ParameterServerStrategy", "PipelineStrategy", "Strategy")
_HOME = {**{n: "dtrain.comm" for n in _COMM}, **{n: "dtrain.parallel" for n in _PARALLEL}}

__all__ = ["CommError", "CommTimeout", "ConfigError", "DataError", "DtrainError", "RendezvousError",
           *_COMM, *_PARALLEL]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    else:  # a submodule: dtrain.ops, dtrain.launch, ...
        try:
            value = importlib.import_module(f"dtrain.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dtrain.{name}":
                raise  # the submodule exists but something it imports does not
            raise AttributeError(f"module 'dtrain' has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | {m.name for m in pkgutil.iter_modules(__path__)})
