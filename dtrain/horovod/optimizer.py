"""hvd.DistributedOptimizer: Horovod's optimizer wrapper over AllReduceStrategy's reducer.

With Compression.none or fp16 and op Average or Sum (what nearly every script uses) the
gradients go through the same bucketed reducer as dtrain.AllReduceStrategy: buckets
launch during backward as their gradients arrive and are reduced by the end of
backward, so ``step()`` finds them ready. Other compressors and ops (Min, Max, Product)
reduce each gradient at ``synchronize()``, in parameter order.

Horovod's rules hold: ``step()`` synchronizes unless inside ``skip_synchronize()``;
``zero_grad()`` between backward and step raises AssertionError; a backward beyond
``backward_passes_per_step`` before ``step()`` raises AssertionError.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from typing import List

import torch

from dtrain.comm.group import resolve
from dtrain.errors import ConfigError
from dtrain.horovod import timeline as hvd_timeline
from dtrain.horovod.basics import (Adasum, Average, NotSupported, Sum, _require_init, global_process_set, group_of,
                                   resolve_op, set_size)
from dtrain.horovod.compression import Compression, wire_of
from dtrain.horovod.ops import _run, allreduce_async_, synchronize as _sync_handle
from dtrain.parallel.data_parallel import _Reducer

_ZERO_GRAD_ERROR = ("optimizer.zero_grad() was called after loss.backward() but before optimizer.step() or "
                    "optimizer.synchronize(). This is prohibited as it can cause a race condition.")


class _Live:
    """Distributed optimizers alive in this process, in creation order (join steps them all)."""
    optimizers: "weakref.WeakValueDictionary[int, torch.optim.Optimizer]" = weakref.WeakValueDictionary()
    count = 0


def _validate_names(named_parameters, param_groups) -> dict:
    """{id(param): name}, with Horovod's errors for unnamed tuples, duplicates and missing names."""
    if named_parameters is None:
        return {id(p): f"allreduce.noname.{i}.{j}" for i, g in enumerate(param_groups)
                for j, p in enumerate(g["params"])}
    named = list(named_parameters)
    if any(not isinstance(p, tuple) or len(p) != 2 for p in named):
        raise ConfigError("named_parameters should be a sequence of tuples (name, parameter), usually produced "
                          "by model.named_parameters().")
    seen, dups = set(), []
    for name, _ in named:
        if name in seen and name not in dups:
            dups.append(name)
        seen.add(name)
    if dups:
        raise ConfigError(f"Parameter names in named_parameters must be unique. Found duplicates: {', '.join(dups)}")
    names = {id(p): n for n, p in named}
    missing = [id(p) for g in param_groups for p in g["params"] if id(p) not in names]
    if missing:
        raise ConfigError("named_parameters was specified, but one or more model parameters were not named. "
                          f"Python object ids: {', '.join(map(str, missing))}")
    return names


class _PerTensor:
    """The general path: each gradient compressed, reduced with `op` and decompressed at
    synchronize(), in parameter order (so every rank issues the same calls)."""

    def __init__(self, params, names, compression, op, prescale, postscale, process_set):
        self.params, self.names = params, names
        self.compression, self.op, self.process_set = compression, op, process_set
        self.prescale, self.postscale = prescale, postscale
        self.state = "idle"
        self.passes_per_step = 1
        self.counts = {id(p): 0 for p in params}
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p) -> None:
        k = self.counts[id(p)] + 1
        if k > self.passes_per_step:
            raise AssertionError(
                "Gradients were computed more than backward_passes_per_step times before call to step(). "
                "Increase backward_passes_per_step to accumulate gradients locally.")
        self.counts[id(p)] = k
        if k == self.passes_per_step:
            self.state = "done"

    def reduce(self) -> None:
        pending = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
            compressed, ctx = self.compression.compress(grad)
            h = allreduce_async_(compressed, name=f"DistributedOptimizer.{self.names[id(p)]}", op=self.op,
                                 prescale_factor=self.prescale, postscale_factor=self.postscale,
                                 process_set=self.process_set)
            pending.append((p, h, ctx))
        for p, h, ctx in pending:
            out = self.compression.decompress(_sync_handle(h), ctx)
            with torch.no_grad():
                if p.grad.is_sparse or p.grad.shape != out.shape:
                    p.grad = out.to(p.dtype)
                else:
                    p.grad.copy_(out)
        self.counts = {k: 0 for k in self.counts}
        self.state = "idle"


class _Methods:
    """What the wrapper adds to the optimizer's own class (copied into a subclass of it)."""

    def synchronize(self) -> None:
        """Finishes the reduction of every gradient now (clip gradients after this, then step
        inside ``with optimizer.skip_synchronize():``)."""
        r = self._hvd_reducer
        if r is not None:
            if isinstance(r, _PerTensor):
                _run("DistributedOptimizer.synchronize", None, r.reduce)
            else:
                if r.state != "done":
                    _run("DistributedOptimizer.synchronize", None, r.before_step)
                r.state = "idle"
        self._hvd_synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """step() inside this block does not synchronize (you called synchronize() yourself)."""
        self._hvd_should_sync = False
        try:
            yield
        finally:
            self._hvd_should_sync = True

    def step(self, closure=None):
        if self._hvd_should_sync:
            if self._hvd_synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). The gradients are reduced already, so this step uses "
                              "them as they are; wrap step() in optimizer.skip_synchronize() to say so.")
            else:
                self.synchronize()
        self._hvd_synchronized = False
        return self._hvd_base.step(self, closure) if closure is not None else self._hvd_base.step(self)

    def zero_grad(self, *args, **kwargs):
        r = self._hvd_reducer
        if r is not None and r.state == "done":
            raise AssertionError(_ZERO_GRAD_ERROR)
        return self._hvd_base.zero_grad(self, *args, **kwargs)

    def set_backward_passes_per_step(self, passes: int) -> None:
        if not isinstance(passes, int) or passes < 1:
            raise ConfigError(f"backward_passes_per_step must be an int >= 1, got {passes!r}")
        self.backward_passes_per_step = passes
        if self._hvd_reducer is not None:
            self._hvd_reducer.passes_per_step = passes


def _fusion_bytes() -> int:
    raw = os.environ.get("HOROVOD_FUSION_THRESHOLD")
    if not raw:
        return 25 << 20  # AllReduceStrategy's default bucket
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"HOROVOD_FUSION_THRESHOLD must be a number of bytes, got {raw!r}") from None
    return max(n, 1)


def DistributedOptimizer(optimizer, named_parameters=None, compression=Compression.none, backward_passes_per_step=1,
                         op=Average, gradient_predivide_factor=1.0, num_groups=0, groups=None,
                         sparse_as_dense=False, process_set=global_process_set):
    """Wraps `optimizer` so gradients are averaged (or summed) across ranks before each step.

    Returns an instance of a subclass of the optimizer's own class sharing its state, so
    isinstance checks, state_dict() and LR schedulers keep working.

    Args:
        named_parameters: model.named_parameters(), to name gradients in errors and the timeline.
        compression: Compression.none, Compression.fp16 (float32 gradients travel as fp16 and
            add in float32 at every hop), or a Compressor of your own.
        backward_passes_per_step: backward passes that accumulate locally before one reduction.
        op: hvd.Average (default), hvd.Sum, hvd.Min, hvd.Max or hvd.Product (hvd.Adasum: refused).
        gradient_predivide_factor: the sum is divided by it before and by size/it after (op must be
            Average); the result is the average either way.
        num_groups, groups: accepted; buckets of HOROVOD_FUSION_THRESHOLD bytes (default 25 MiB)
            group gradients here.
        sparse_as_dense: sparse gradients are reduced dense in any case.

    Example (``dtrain-run -np 2 train.py``)::

        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        loss.backward()
        optimizer.step()
    """
    _require_init()
    if getattr(optimizer, "_hvd_base", None) is not None:
        raise ConfigError("this optimizer is a DistributedOptimizer already: wrap the plain optimizer once")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    op = resolve_op(op, None)
    if op == Adasum:
        raise NotSupported("op=hvd.Adasum is not provided by dtrain.horovod: use op=hvd.Average")
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ConfigError("gradient_predivide_factor not supported with op != Average")
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ConfigError(f"backward_passes_per_step must be an int >= 1, got {backward_passes_per_step!r}")
    names = _validate_names(named_parameters, optimizer.param_groups)
    base = optimizer.__class__
    methods = {k: v for k, v in _Methods.__dict__.items() if not k.startswith("__")}
    cls = type(base.__name__, (base,), methods)
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)  # the same param_groups, state and hooks
    wrapped._hvd_base = base
    wrapped._hvd_should_sync = True
    wrapped._hvd_synchronized = False
    wrapped.backward_passes_per_step = backward_passes_per_step
    wrapped._hvd_reducer = None
    seen, params = set(), []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if set_size(process_set) > 1 and params:
        wrapped._hvd_reducer = _reducer(params, names, compression, op, gradient_predivide_factor,
                                        backward_passes_per_step, process_set)
    _Live.count += 1
    _Live.optimizers[_Live.count] = wrapped
    return wrapped


def _reducer(params, names, compression, op, predivide, passes, process_set):
    group = group_of(process_set)
    wire = wire_of(compression)
    if wire is not None and op in (Average, Sum):
        # On one host's shared memory the native backend sends float32 whatever is asked (halving
        # bytes there saves less than converting costs): the exact sum, faster than converting.
        compress = "fp16" if wire == "fp16" and resolve(group).compress_wire else None
        r = _Reducer(params, group, _fusion_bytes(), compress, False, op == Average,
                     names=[names[id(p)] for p in params], timeline=hvd_timeline.current())
        r.passes_per_step = passes
        r.one_reduction_per_step = True
        r.densify = True
        return r
    n = set_size(process_set)
    prescale, postscale = (1.0 / predivide, predivide / n) if predivide != 1.0 else (1.0, 1.0)
    if predivide != 1.0:
        op = Sum
    r = _PerTensor(params, names, compression if wire is None else
                   (Compression.none if wire == "none" else Compression.fp16), op, prescale, postscale, process_set)
    r.passes_per_step = passes
    return r


def attach_timeline(t) -> None:
    for o in list(_Live.optimizers.values()):
        r = o._hvd_reducer
        if isinstance(r, _Reducer):
            r.timeline = t


def join_steps() -> int:
    """hvd.join(): zero-gradient reductions alongside the ranks still stepping, until none is;
    returns the rank that joined last."""
    import dtrain
    reducers: List[_Reducer] = [o._hvd_reducer for _, o in sorted(_Live.optimizers.items())
                                if isinstance(o._hvd_reducer, _Reducer)]
    rounds = 0
    try:
        while reducers:
            anyone = False
            for r in reducers:
                r.active = False
                r.state = "idle"
                r._reset()
                r._finish(from_grads=False)
                r.state = "idle"
                anyone = anyone or r.others_active
            rounds += 1
            if not anyone:
                break
    finally:
        for r in reducers:
            r.active = True
    if dtrain.world_size() == 1:
        return 0
    every = dtrain.allgather(torch.tensor([rounds], dtype=torch.int64)).tolist()
    fewest = min(every)
    return max(r for r, k in enumerate(every) if k == fewest)


__all__ = ["DistributedOptimizer"]
