"""Micro-batching: split a batch (a tensor, or tuples, lists and dicts of them) along dim 0 into
micro-batches, and flatten any such structure into its tensors plus a skeleton to rebuild it.

Nothing here knows about stages or schedules.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch

from dtrain.errors import ConfigError


def _batch_sizes(obj: Any, path: str, out: List[Tuple[str, int]]) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            raise ConfigError(f"cannot split the 0-d tensor at {path} into micro-batches: every tensor of a "
                              "batch needs the batch as dim 0 (wrap scalars that are the same for every "
                              "sample in a Python number instead)")
        out.append((path, obj.shape[0]))
    elif isinstance(obj, (tuple, list)):
        for i, x in enumerate(obj):
            _batch_sizes(x, f"{path}[{i}]", out)
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _batch_sizes(x, f"{path}[{k!r}]", out)


def map_leaves(obj: Any, kind: type, fn) -> Any:
    """`obj` rebuilt with every `kind` instance x inside its tuples, lists and dicts replaced by
    fn(x), in order; anything else stays as it is."""
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_leaves(x, kind, fn) for x in obj)
    if isinstance(obj, list):
        return [map_leaves(x, kind, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: map_leaves(x, kind, fn) for k, x in obj.items()}
    return obj  # numbers, strings, None: the same for every micro-batch


def split(batch: Any, chunks: int, name: str = "batch") -> List[Any]:
    """`batch` cut into `chunks` micro-batches along dim 0 of every tensor in it.

    Sizes differ by at most one (the first ones get the extra rows), as torch.tensor_split does;
    non-tensor leaves are passed to every micro-batch unchanged.

    Example::

        split((torch.zeros(5, 3), {"mask": torch.ones(5)}), 2)
        # [(zeros(3, 3), {"mask": ones(3)}), (zeros(2, 3), {"mask": ones(2)})]
    """
    if not isinstance(chunks, int) or chunks < 1:
        raise ConfigError(f"micro_batches must be a positive int, got {chunks!r}")
    sizes: List[Tuple[str, int]] = []
    _batch_sizes(batch, name, sizes)
    if not sizes:
        raise ConfigError(f"{name} holds no tensor to split into micro-batches")
    n = sizes[0][1]
    for path, k in sizes:
        if k != n:
            raise ConfigError(f"the tensors of {name} disagree on the batch size: {sizes[0][0]} has {n} rows "
                              f"but {path} has {k}; every tensor needs the batch along dim 0")
    if n < chunks:
        raise ConfigError(f"{name} has {n} samples, fewer than micro_batches={chunks}: use a batch of at "
                          f"least {chunks} samples or fewer micro-batches")
    base, extra = divmod(n, chunks)
    out, at = [], 0
    for i in range(chunks):
        k = base + (1 if i < extra else 0)
        out.append(map_leaves(batch, torch.Tensor, lambda t, lo=at, hi=at + k: t[lo:hi]))
        at += k
    return out


def rows(batch: Any) -> int:
    """The batch size of `batch` (dim 0 of its first tensor)."""
    sizes: List[Tuple[str, int]] = []
    _batch_sizes(batch, "batch", sizes)
    return sizes[0][1] if sizes else 0


# ---- flattening, for sending a structure between stages

class Leaf:
    """A tensor's place in a skeleton: its shape, dtype and whether it wants a gradient back."""

    __slots__ = ("shape", "dtype", "requires_grad")

    def __init__(self, t: torch.Tensor):
        self.shape = tuple(t.shape)
        self.dtype = t.dtype
        self.requires_grad = bool(t.requires_grad and (t.is_floating_point() or t.is_complex()))

    def __getstate__(self):
        return (self.shape, str(self.dtype).replace("torch.", ""), self.requires_grad)

    def __setstate__(self, state):
        self.shape, dtype, self.requires_grad = state
        self.dtype = getattr(torch, dtype)

    def __eq__(self, other):
        return isinstance(other, Leaf) and self.__getstate__() == other.__getstate__()

    def __repr__(self):
        return f"{str(self.dtype).replace('torch.', '')}{self.shape}"


def flatten(obj: Any) -> Tuple[Any, List[torch.Tensor]]:
    """(skeleton, tensors): the skeleton is `obj` with each tensor replaced by a Leaf."""
    tensors: List[torch.Tensor] = []

    def keep(t):
        tensors.append(t)
        return Leaf(t)

    return map_leaves(obj, torch.Tensor, keep), tensors


def unflatten(skeleton: Any, tensors: List[torch.Tensor]) -> Any:
    """The inverse of flatten()."""
    it = iter(tensors)
    return map_leaves(skeleton, Leaf, lambda _: next(it))


def leaves(skeleton: Any) -> List[Leaf]:
    out: List[Leaf] = []
    map_leaves(skeleton, Leaf, out.append)
    return out


def describe(skeleton: Any) -> str:
    """A short text of a skeleton, for errors: ``(float32(4, 16), {'mask': bool(4,)})``."""
    if isinstance(skeleton, Leaf):
        return repr(skeleton)
    if isinstance(skeleton, tuple):
        return "(" + ", ".join(describe(x) for x in skeleton) + ")"
    if isinstance(skeleton, list):
        return "[" + ", ".join(describe(x) for x in skeleton) + "]"
    if isinstance(skeleton, dict):
        return "{" + ", ".join(f"{k!r}: {describe(x)}" for k, x in skeleton.items()) + "}"
    return repr(skeleton)
