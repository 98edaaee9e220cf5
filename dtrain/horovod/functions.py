"""broadcast_parameters, broadcast_optimizer_state, broadcast_object, allgather_object."""

from __future__ import annotations

import io
import pickle
from typing import List

import torch

from dtrain.comm.api import allgather_bytes, broadcast_bytes
from dtrain.comm.group import resolve
from dtrain.comm.tensors import broadcast_coalesced
from dtrain.errors import ConfigError
from dtrain.horovod.basics import check_root, global_process_set, group_of, set_rank
from dtrain.horovod.ops import _run, broadcast_
from dtrain.horovod.transfer import _agree_on_root


def _named(params, what: str) -> List[tuple]:
    if isinstance(params, dict):
        return sorted(params.items())
    try:
        items = list(params)
    except TypeError:
        raise ConfigError(f"{what}: params must be a state_dict, named_parameters() or a list of tensors, "
                          f"got {type(params).__name__}") from None
    return [p if isinstance(p, tuple) else (None, p) for p in items]


def broadcast_parameters(params, root_rank: int, process_set=global_process_set) -> None:
    """Overwrites every tensor of `params` with rank `root_rank`'s, in place: a state_dict, the
    output of named_parameters(), or a list of tensors. Tensors of one dtype travel as one
    fused broadcast.

    Example::

        hvd.broadcast_parameters(model.state_dict(), root_rank=0)   # every rank starts alike
    """
    root = check_root(root_rank, process_set, "broadcast_parameters")
    tensors = [t for _, t in _named(params, "broadcast_parameters") if t is not None]
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"broadcast_parameters: every value must be a tensor, got {type(t).__name__}")
    _broadcast_fused(tensors, root, process_set)


def _broadcast_fused(tensors: List[torch.Tensor], root: int, process_set) -> None:
    broadcast_coalesced(tensors, lambda t: broadcast_(t, root, process_set=process_set))


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    try:
        import cloudpickle  # what Horovod uses: lambdas and local classes pickle too
        cloudpickle.dump(obj, buf)
    except ImportError:
        pickle.dump(obj, buf, protocol=pickle.HIGHEST_PROTOCOL)
    return buf.getvalue()


def broadcast_object(obj, root_rank: int = 0, name=None, process_set=global_process_set):
    """Returns rank `root_rank`'s `obj` (anything picklable) on every rank.

    Example (2 ranks)::

        cfg = hvd.broadcast_object({"lr": 0.1 * (hvd.rank() + 1)}, root_rank=1)   # both: {'lr': 0.2}
    """
    root = check_root(root_rank, process_set, "broadcast_object")
    group = group_of(process_set)
    mine = set_rank(process_set) == root
    payload = _dumps(obj) if mine else b""
    _agree_on_root(resolve(group), root, torch.empty(0, dtype=torch.uint8), "broadcast_object", name)
    blob = _run("broadcast_object", name, lambda: broadcast_bytes(payload, root, group))
    return obj if mine else pickle.loads(blob)


def allgather_object(obj, name=None, process_set=global_process_set) -> list:
    """Every rank's `obj`, as a list in rank order.

    Example (2 ranks)::

        hvd.allgather_object({"rank": hvd.rank()})   # both: [{'rank': 0}, {'rank': 1}]
    """
    group = group_of(process_set)
    blobs = _run("allgather_object", name, lambda: allgather_bytes(_dumps(obj), group=group))
    return [pickle.loads(b) for b in blobs]


def _skeleton(sd, tensors: list):
    """The state_dict with each tensor replaced by its index in `tensors` (appended)."""
    if isinstance(sd, torch.Tensor):
        tensors.append(sd)
        return ("__tensor__", len(tensors) - 1, tuple(sd.shape), str(sd.dtype)[6:])
    if isinstance(sd, dict):
        return {k: _skeleton(v, tensors) for k, v in sd.items()}
    if isinstance(sd, (list, tuple)):
        return type(sd)(_skeleton(v, tensors) for v in sd)
    return sd


def _fill(sk, tensors: list):
    if isinstance(sk, tuple) and len(sk) == 4 and sk[0] == "__tensor__":
        return tensors[sk[1]]
    if isinstance(sk, dict):
        return {k: _fill(v, tensors) for k, v in sk.items()}
    if isinstance(sk, (list, tuple)):
        return type(sk)(_fill(v, tensors) for v in sk)
    return sk


def broadcast_optimizer_state(optimizer, root_rank: int, model=None, process_set=global_process_set) -> None:
    """Makes every rank's optimizer state (hyper-parameters and per-parameter state, such as
    Adam's moments) rank `root_rank`'s. Works before the first step too (ranks without state
    take the root's, or none). The layout travels as one small object, the tensors as fused
    broadcasts.
    """
    root = check_root(root_rank, process_set, "broadcast_optimizer_state")
    if not hasattr(optimizer, "state_dict") or not hasattr(optimizer, "load_state_dict"):
        raise ConfigError(f"broadcast_optimizer_state takes a torch optimizer, got {type(optimizer).__name__}")
    mine = set_rank(process_set) == root
    tensors: list = []
    skeleton = _skeleton(optimizer.state_dict(), tensors) if mine else None
    skeleton = broadcast_object(skeleton, root, process_set=process_set)
    if not mine:
        tensors = []
        _collect_specs(skeleton, tensors)
    _broadcast_fused(tensors, root, process_set)
    if not mine:
        optimizer.load_state_dict(_fill(skeleton, tensors))


def _collect_specs(sk, out: list) -> None:
    """Empty tensors for each placeholder of a skeleton, in index order."""
    if isinstance(sk, tuple) and len(sk) == 4 and sk[0] == "__tensor__":
        _, i, shape, dtype = sk
        while len(out) <= i:
            out.append(None)
        out[i] = torch.empty(shape, dtype=getattr(torch, dtype))
        return
    if isinstance(sk, dict):
        for v in sk.values():
            _collect_specs(v, out)
    elif isinstance(sk, (list, tuple)):
        for v in sk:
            _collect_specs(v, out)


__all__ = ["broadcast_parameters", "broadcast_optimizer_state", "broadcast_object", "allgather_object"]
