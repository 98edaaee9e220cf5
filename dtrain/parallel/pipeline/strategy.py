"""PipelineStrategy: a model's layers split across the ranks of a group, micro-batches flowing
through them under a schedule (GPipe or 1F1B)."""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import dtrain
from dtrain.errors import ConfigError
from dtrain.parallel import checkpoint
from dtrain.parallel.data_parallel import data_parallel_of
from dtrain.parallel.pipeline import microbatch, partition, schedules
from dtrain.parallel.pipeline.stage import PipelineStage
from dtrain.parallel.strategy import GroupStrategy


class PipelineStrategy(GroupStrategy):
    """Pipeline parallelism: each rank of `group` runs a contiguous run of the model's layers.

    Args:
        micro_batches: how many pieces each batch is cut into along dim 0.
        schedule: "1f1b" (a stage holds at most `stages` micro-batches of activations) or
            "gpipe" (all forwards, then all backwards; holds all of them).
        balance: None (the same number of layers per stage), a list of layer counts,
            "params" (by parameter count) or "time" (by measured forward time; give
            prepare() a `sample` micro-batch).
        checkpoint_activations: keep only each stage's input per micro-batch and recompute
            the rest in backward (less memory, about a third more compute).
        group: the ranks of this pipeline, stage i on group rank i; None is the world.
            With data parallelism across pipelines, give each pipeline its own group and
            prepare the stage with an AllReduceStrategy over the replicas of that stage.
        track_memory: count the bytes autograd saves for backward (stats()["peak_saved_bytes"]).

    Example (``dtrain-run -n 2 train.py``)::

        strategy = dtrain.PipelineStrategy(micro_batches=8)
        stage, optimizer = strategy.prepare(model, optimizer)    # model: an nn.Sequential
        for x, y in loader:                                      # the same batches on every stage
            optimizer.zero_grad()
            loss = strategy.train_step((x, y), F.cross_entropy)  # the mean loss, on every rank
            optimizer.step()
    """

    def __init__(self, micro_batches: int = 8, schedule: str = "1f1b", balance=None,
                 checkpoint_activations: bool = False, group: Optional["dtrain.Group"] = None,
                 track_memory: bool = False):
        super().__init__(group)
        if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
            raise ConfigError(f"micro_batches must be a positive int, got {micro_batches!r}")
        self.micro_batches = micro_batches
        self.schedule = schedules.get(schedule)
        self.balance = balance
        self.checkpoint_activations = bool(checkpoint_activations)
        self.track_memory = bool(track_memory)
        if not dtrain.is_initialized():
            dtrain.init()
        if group is not None and group.rank < 0:
            raise ConfigError(f"rank {dtrain.rank()} is not in the pipeline group {group.ranks}: give each rank "
                              "the group of the pipeline it belongs to")
        self.stage: Optional[PipelineStage] = None
        self.layers: Tuple[int, int] = (0, 0)
        self._last: Dict[str, float] = {}

    # ---- who am I
    @property
    def is_main(self) -> bool:
        """True on the last stage, where the loss is computed."""
        return self.rank == self.world_size - 1

    def _ranks(self) -> List[int]:
        return self._group.ranks if self._group is not None else list(range(dtrain.world_size()))

    # ---- set-up
    def prepare(self, model, optimizer: Optional[torch.optim.Optimizer] = None, sample: Any = None):
        """Keeps this rank's stage of `model` and returns (stage module, optimizer).

        `model` is an nn.Sequential (split by `balance`) or a list of one module per stage.
        The optimizer keeps only this stage's parameters (its param groups stay, in place: a
        reference held elsewhere sees the change). `sample` is one micro-batch of inputs, for
        balance="time".
        """
        if self.stage is not None:
            raise ConfigError("this PipelineStrategy already prepared a model: make one strategy per model")
        p, s = self.world_size, self.rank
        if isinstance(model, torch.nn.Sequential):
            items = list(model._modules.items())
            counts = partition.counts_for(self.balance, [m for _, m in items], p, sample, agree=self._agree)
            lo = sum(counts[:s])
            hi = lo + counts[s]
            module = torch.nn.Sequential(collections.OrderedDict(items[lo:hi]))  # keys keep their numbers
            self.layers = (lo, hi)
        elif isinstance(model, (list, tuple)) and all(isinstance(m, torch.nn.Module) for m in model):
            if len(model) != p:
                raise ConfigError(f"got {len(model)} stage modules for a pipeline of {p} ranks: give one per rank, "
                                  "or an nn.Sequential to split")
            if self.balance is not None:
                raise ConfigError("balance splits an nn.Sequential; a list of stage modules is already split")
            module = model[s]
            self.layers = (s, s + 1)
        else:
            raise ConfigError(f"PipelineStrategy.prepare takes an nn.Sequential or a list of stage modules, got "
                              f"{type(model).__name__}: wrap the layers in torch.nn.Sequential(...)")
        if optimizer is not None:
            _keep_only(optimizer, module)
        self.stage = PipelineStage(module, s, p, self._group, self._ranks(), self.checkpoint_activations,
                                   self.track_memory)
        return module, optimizer

    def _agree(self, weights: List[float]) -> List[float]:
        if self.world_size == 1:
            return weights
        t = torch.tensor(weights, dtype=torch.float64)
        dtrain.allreduce(t, op="avg", group=self._group)
        return t.tolist()

    # ---- training
    def train_step(self, batch: Tuple[Any, Any], loss_fn: Callable[[Any, Any], torch.Tensor]) -> torch.Tensor:
        """One forward and backward pass over the batch, cut into micro-batches, under the schedule.

        batch: (inputs, targets); the first stage reads inputs, the last targets (others may pass
            None for either). Tensors, tuples, lists and dicts of them are cut along dim 0.
        loss_fn(outputs, targets) -> scalar mean over the micro-batch.

        Gradients accumulate in .grad as one backward of the mean loss over the whole batch
        would leave them; optimizer.step() stays yours. Returns that mean loss (a 0-d float32
        tensor, detached) on every rank of the pipeline.
        """
        return self._step(batch, loss_fn, grad=True)

    def eval_step(self, batch: Tuple[Any, Any], loss_fn: Callable[[Any, Any], torch.Tensor]) -> torch.Tensor:
        """The mean loss over `batch` without gradients (forward passes only), on every rank."""
        return self._step(batch, loss_fn, grad=False)

    def _step(self, batch, loss_fn, grad: bool) -> torch.Tensor:
        stage = self.stage
        if stage is None:
            raise ConfigError("call strategy.prepare(model, optimizer) before train_step")
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ConfigError(f"train_step takes batch=(inputs, targets), got {type(batch).__name__}"
                              f"{' of ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}")
        inputs, targets = batch
        m = self.micro_batches
        ins = microbatch.split(inputs, m, "inputs") if stage.is_first else None
        tgts = microbatch.split(targets, m, "targets") if stage.is_last else None
        rows = [microbatch.rows(t) for t in tgts] if tgts is not None else [1] * m
        stage.begin(ins, tgts, loss_fn, rows, grad=grad)
        t0 = time.perf_counter()
        if grad:
            with self._sync_only_last(stage.module, m):
                self.schedule.run(stage, m)
        else:
            self.schedule.forward_only(stage, m)
        loss = stage.end()
        step_s = time.perf_counter() - t0
        self._last = {"step_s": step_s, "compute_s": stage.compute_s,
                      "bubble": max(0.0, 1.0 - stage.compute_s / step_s) if step_s > 0 else 0.0}
        out = torch.zeros(1, dtype=torch.float32)
        if loss is not None:
            out[0] = loss.float()
        if self.world_size > 1:
            dtrain.broadcast(out, root=self.world_size - 1, group=self._group)
        return out[0]

    @contextlib.contextmanager
    def _sync_only_last(self, module: torch.nn.Module, m: int):
        """With a data-parallel strategy over this stage's replicas, gradients are reduced once per
        step: during the last micro-batch's backward (the others run under its no_sync)."""
        dp = data_parallel_of(module)
        if dp is None or dp.reducer is None:
            yield
            return
        stage = self.stage
        stage.backward_context = lambda mb: contextlib.nullcontext() if mb == m - 1 else dp.no_sync(module)
        try:
            yield
        finally:
            stage.backward_context = None

    def stats(self) -> Dict[str, Any]:
        """This stage's layers and its last step: seconds, compute seconds, bubble (the idle share),
        the most micro-batches it held activations for, and (track_memory) saved bytes at the peak."""
        st = self.stage
        out: Dict[str, Any] = {"stage": self.rank, "stages": self.world_size, "layers": self.layers,
                               "schedule": self.schedule.name, "micro_batches": self.micro_batches}
        if st is not None:
            out.update(self._last)
            out["peak_in_flight"] = st.peak_in_flight
            out["trace"] = list(st.trace)
            if st.meter is not None:
                out["peak_saved_bytes"] = st.meter.peak
        return out

    # ---- everything else the base offers (reduce_metrics averages over the stages, which
    # see the same batch: each stage's own value when it is one they share, such as the loss)
    def distribute(self, data, batch_size: Optional[int] = None, shuffle: Optional[bool] = None,
                   seed: int = 0, drop_last: bool = False, **loader_kwargs):
        """The same batches on every stage (stage 0 needs the inputs, the last stage the targets).
        With data parallelism across pipelines, shard with the AllReduceStrategy instead."""
        from dtrain.parallel.sharding import shard_loader
        return shard_loader(data, 0, 1, batch_size, shuffle, seed, drop_last, **loader_kwargs)

    def save(self, path: str, model: Optional[torch.nn.Module] = None,
             optimizer: Optional[torch.optim.Optimizer] = None, step: Optional[int] = None, **extra) -> str:
        """Every stage writes its own shard (checkpoint-shard{stage}-of-{stages}.pt) atomically;
        with data-parallel replicas only replica 0 writes. `model` defaults to this stage."""
        if self.stage is None:
            raise ConfigError("call strategy.prepare(model, optimizer) before save")
        model = self.stage.module if model is None else model
        file = checkpoint.shard_file(path, self.rank, self.world_size)
        dp = data_parallel_of(self.stage.module)
        if dp is None or dp.rank == 0:
            payload = {
                "dtrain_format": checkpoint.FORMAT, "world_size": self.world_size,
                "shard": (self.rank, self.world_size), "layers": self.layers,
                "model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "step": step, "rng": [checkpoint.rng_state()], "extra": extra,
            }
            checkpoint.atomic_write(file, checkpoint.serialize(payload))
        dtrain.barrier()
        return file

    def load(self, path: str, model: Optional[torch.nn.Module] = None,
             optimizer: Optional[torch.optim.Optimizer] = None, strict: bool = True) -> Dict[str, Any]:
        """Restores this stage's shard (saved by save() from the same layout)."""
        if self.stage is None:
            raise ConfigError("call strategy.prepare(model, optimizer) before load")
        model = self.stage.module if model is None else model
        file = checkpoint.shard_file(path, self.rank, self.world_size)
        payload = checkpoint.read(file)
        checkpoint.check_shard(payload, file, (self.rank, self.world_size))
        if tuple(payload.get("layers", self.layers)) != tuple(self.layers):
            raise ConfigError(f"{file} holds layers {tuple(payload['layers'])} of the model but stage {self.rank} "
                              f"now runs layers {self.layers}: use the balance the checkpoint was saved with")
        return checkpoint.restore(payload, 0, model, optimizer, strict=strict)


def _keep_only(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> None:
    mine = {id(p) for p in module.parameters()}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in mine]
    for p in list(optimizer.state):
        if id(p) not in mine:
            del optimizer.state[p]


__all__ = ["PipelineStrategy"]
