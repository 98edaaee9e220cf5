"""Asynchronous data parallelism through parameter servers, with bounded staleness.

    strategy = dtrain.ParameterServerStrategy(num_servers=1, staleness=2)
    model, optimizer = strategy.prepare(model, optimizer)   # on a server: serves until training ends
    for batch in strategy.distribute(dataset, batch_size=64):   # nothing on a server
        loss = loss_fn(model(batch[0]), batch[1])
        optimizer.zero_grad(); loss.backward(); optimizer.step()   # step() is the push/pull

How it works:

* Ranks ``0..num_servers-1`` are servers, the rest workers. The optimizer's parameters
  (float32, CPU) are laid out as one flat vector, group by group, and cut into
  ``num_servers`` contiguous, equal slices, so bytes are balanced and a large tensor
  spans servers. Each server keeps its slice and the optimizer's state for it, and
  applies pushed gradients with dtrain's fused CPU kernels on C++ threads
  (dtrain._C.ps.Server) that never take the GIL.
* ``optimizer.step()`` on a worker packs the gradients and starts the exchange on a C++
  thread: each server gets its slice (float32, or fp16/bf16 with ``compression``) and
  answers with its fresh parameters. The worker carries on (``zero_grad``, loading the
  next batch) and the model's forward pre-hook waits for the answer, so the push of one
  step overlaps the start of the next.
* ``staleness=s``: a server answers a worker's push only when that worker is at most
  ``s`` steps ahead of the slowest live worker (stale synchronous parallel).
  ``staleness=0`` averages every live worker's gradient for a step and applies it once,
  which is synchronous training; ``None`` applies every push at once as its own step.
* A worker that dies is dropped from the clock and the others go on (under
  ``dtrain-run`` the job continues without it). A server that dies ends the job: its
  workers raise CommError naming it.
* Checkpoints: ``save`` on the first worker asks every server to write its shard
  (parameters, optimizer state, progress) atomically under a name that carries the
  step, then writes the main file, which names those shards, atomically; older shards go
  only after that, so a crash at any point leaves the previous checkpoint whole.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import zlib
from typing import Any, Dict, List, Optional, Tuple

import torch

import dtrain
from dtrain import _C
from dtrain.comm.group import current
from dtrain.errors import ConfigError, DataError
from dtrain.launch.local import mark_expendable
from dtrain.parallel import checkpoint
from dtrain.parallel.strategy import Strategy

SHARD_FORMAT = 1
_WIRE = {None: _C.DType.float32, "fp16": _C.DType.float16, "bf16": _C.DType.bfloat16}


def _optimizer_spec(optimizer: torch.optim.Optimizer) -> Tuple[str, List[Dict[str, Any]]]:
    """The servers' update rule ("sgd", "adam", "adamw") and each group's hyper-parameters."""
    from dtrain.optim import FusedAdam, FusedAdamW, FusedSGD
    if isinstance(optimizer, (torch.optim.AdamW, FusedAdamW)):
        kind = "adamw"
    elif isinstance(optimizer, (torch.optim.Adam, FusedAdam)):
        kind = "adamw" if any(g.get("decoupled_weight_decay") for g in optimizer.param_groups) else "adam"
    elif isinstance(optimizer, (torch.optim.SGD, FusedSGD)):
        kind = "sgd"
    else:
        raise ConfigError(f"ParameterServerStrategy's servers apply SGD, Adam or AdamW (torch.optim or dtrain.optim), "
                          f"not {type(optimizer).__name__}: pass one of those, or optimizer=lambda params: "
                          "torch.optim.Adam(params, ...) to the strategy")
    groups = []
    for i, g in enumerate(optimizer.param_groups):
        if g.get("amsgrad"):
            raise ConfigError(f"parameter group {i} uses amsgrad, which the parameter servers do not apply: "
                              "use amsgrad=False")
        spec = {"lr": float(g["lr"]), "weight_decay": float(g.get("weight_decay", 0.0)),
                "maximize": bool(g.get("maximize", False))}
        if kind == "sgd":
            spec.update(momentum=float(g.get("momentum", 0.0)), dampening=float(g.get("dampening", 0.0)),
                        nesterov=bool(g.get("nesterov", False)))
        else:
            spec.update(betas=tuple(float(b) for b in g["betas"]), eps=float(g["eps"]))
        groups.append(spec)
    return kind, groups


def _reachable_address() -> str:
    """The address of this host's interface that reaches the rendezvous host (no packet is sent)."""
    master = os.environ.get("DTRAIN_MASTER_ADDR") or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class ParameterServerStrategy(Strategy):
    """Servers hold the parameters and apply the optimizer; workers push gradients and pull
    parameters without waiting for each other, up to `staleness` steps apart.

    Args:
        num_servers: the first `num_servers` ranks serve; the rest train. At least one of each.
        staleness: None (fully asynchronous), 0 (synchronous: each step averages every live
            worker's gradient) or s > 0 (no worker runs more than s steps ahead of the slowest).
        compression: None, "fp16" or "bf16": how gradients travel (parameters come back float32).
        optimizer: the servers' optimizer when it should differ from the one given to prepare():
            a callable taking the parameters and returning a torch.optim/dtrain.optim SGD, Adam
            or AdamW. By default the servers apply prepare()'s optimizer, hyper-parameters and
            all; a learning-rate scheduler stepping it on the workers reaches the servers too.
        overlap: let step() return while the exchange runs (the next forward waits for it).
        timeout: seconds a worker may wait for a slow peer (default: dtrain.init's timeout).

    Example::

        strategy = dtrain.ParameterServerStrategy(num_servers=1, staleness=2)
        model, optimizer = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        for x, y in strategy.distribute(train_set, batch_size=64):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        print(strategy.stats())
    """

    def __init__(self, num_servers: int = 1, staleness: Optional[int] = None, compression: Optional[str] = None,
                 optimizer=None, overlap: bool = True, timeout: Optional[float] = None):
        super().__init__(None)
        if not isinstance(num_servers, int) or num_servers < 1:
            raise ConfigError(f"num_servers must be a positive int, got {num_servers!r}")
        if staleness is not None and (not isinstance(staleness, int) or staleness < 0):
            raise ConfigError(f"staleness must be None (asynchronous) or an int >= 0, got {staleness!r}")
        if compression not in _WIRE:
            raise ConfigError(f"compression must be None, 'fp16' or 'bf16', got {compression!r}")
        if optimizer is not None and not callable(optimizer):
            raise ConfigError(f"optimizer must be None or a callable params -> optimizer, got {optimizer!r}")
        self.num_servers, self.staleness, self.compression = num_servers, staleness, compression
        self._optimizer_factory, self.overlap, self._timeout = optimizer, overlap, timeout
        self._server = None
        self._client = None
        self._params: List[torch.Tensor] = []
        self._bounds: List[int] = []
        self._pending = False
        self._hook = None
        self._worker_group = None
        self._loaded: Dict[str, int] = {}
        self._server_stats: Optional[List[Dict[str, Any]]] = None
        self._steps = 0
        self._leads: List[int] = []
        self._exchange_seconds = 0.0

    # ---- who am I
    @property
    def rank(self) -> int:
        return dtrain.rank()

    @property
    def world_size(self) -> int:
        return dtrain.world_size()

    @property
    def is_server(self) -> bool:
        return self.rank < self.num_servers

    @property
    def num_workers(self) -> int:
        return self.world_size - self.num_servers

    @property
    def worker_index(self) -> int:
        """This worker's index among the workers (0 .. num_workers-1); -1 on a server."""
        return self.rank - self.num_servers if not self.is_server else -1

    @property
    def is_main(self) -> bool:
        """True on the first worker, which logs and writes checkpoints."""
        return self.rank == self.num_servers

    # ---- training
    def prepare(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        """Servers: serve until every worker has finished (or is gone), then return.
        Workers: start from the first worker's parameters; optimizer.step() becomes the push/pull."""
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"prepare() takes a torch.nn.Module, got {type(model).__name__}")
        if self._params:
            raise ConfigError("this ParameterServerStrategy already prepared a model: make one strategy per model")
        if not dtrain.is_initialized():
            raise ConfigError("ParameterServerStrategy needs dtrain.init() first (run under dtrain-run -n N)")
        if self.world_size <= self.num_servers:
            raise ConfigError(f"ParameterServerStrategy(num_servers={self.num_servers}) needs at least one worker "
                              f"besides the servers, but the world has {self.world_size} rank(s): launch with "
                              f"dtrain-run -n {self.num_servers + 1} or more")
        server_opt = self._optimizer_factory(list(model.parameters())) if self._optimizer_factory else optimizer
        if server_opt is None:
            raise ConfigError("ParameterServerStrategy.prepare needs the optimizer the servers should apply: "
                              "prepare(model, optimizer), or ParameterServerStrategy(optimizer=...)")
        kind, group_specs = _optimizer_spec(server_opt)
        params, group_sizes = self._layout(model, server_opt)
        total = sum(p.numel() for p in params)
        S = self.num_servers
        self._bounds = [total * s // S for s in range(S + 1)]
        layout_hash = zlib.crc32(repr((kind, S, [tuple(p.shape) for p in params], group_sizes)).encode())
        timeout = float(self._timeout if self._timeout is not None else current().timeout)
        self._worker_group = dtrain.new_group(list(range(S, self.world_size)))

        # Everyone starts from the first worker's model (parameters and buffers).
        flat = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)
        dtrain.broadcast(flat, root=S)
        for b in model.buffers():
            if b.numel() and b.dtype != torch.bool:
                dtrain.broadcast(b.data, root=S)
        with torch.no_grad():
            off = 0
            for p in params:
                p.copy_(flat[off: off + p.numel()].view_as(p))
                off += p.numel()

        token = os.environ.get("DTRAIN_JOB_TOKEN", "")
        me = b""
        if self.is_server:
            lo, hi = self._bounds[self.rank], self._bounds[self.rank + 1]
            slices, start = [], 0
            for gi, (n, spec) in enumerate(zip(group_sizes, group_specs)):
                b, e = max(start, lo), min(start + n, hi)
                if b < e:
                    slices.append(dict(spec, begin=b - lo, end=e - lo, group=gi))
                start += n
            shard = flat[lo:hi].clone()
            self._server = _C.ps.Server(
                token=token, optimizer=kind, num_workers=self.num_workers, num_groups=len(group_specs),
                first_worker_rank=S, rank=self.rank, staleness=-1 if self.staleness is None else self.staleness,
                timeout=timeout, layout_hash=layout_hash, bind_host="", groups=slices,
                params=shard.data_ptr(), count=hi - lo)
            self._slices = slices
            me = f"{_reachable_address()}:{self._server.port}".encode()
        record = torch.zeros(64, dtype=torch.uint8)
        record[:len(me)] = torch.frombuffer(bytearray(me), dtype=torch.uint8) if me else record[:0]
        records = dtrain.allgather(record).view(self.world_size, 64)[:S]
        addrs = [bytes(r.tolist()).rstrip(b"\0").decode() for r in records]

        if self.is_server:
            self._serve()
            return model, optimizer

        self._params = params
        self._flat_grad = torch.zeros(total)
        self._flat_in = torch.zeros(total)
        self._views = []
        off = 0
        for p in params:
            self._views.append((p, self._flat_grad[off: off + p.numel()].view_as(p),
                                self._flat_in[off: off + p.numel()].view_as(p)))
            off += p.numel()
        self._optimizer = optimizer if optimizer is not None else server_opt
        self._client = _C.ps.Client(
            token=token, worker=self.worker_index, rank=self.rank, hosts=[a.rsplit(":", 1)[0] for a in addrs],
            ports=[int(a.rsplit(":", 1)[1]) for a in addrs], server_ranks=list(range(S)), bounds=self._bounds,
            layout_hash=layout_hash, num_groups=len(group_specs), timeout=timeout)
        if self._client.step:  # rejoining a running job: take the current parameters
            self._client.pull(self._flat_in.data_ptr())
            self._adopt()
        # The others go on without this worker should it fail; dtrain-run need not stop the job.
        mark_expendable(self.rank, "a parameter-server worker")
        self._hook = model.register_forward_pre_hook(lambda *a: self.synchronize())
        self._optimizer.step = self._step  # the instance's step: the servers apply the update
        _before_shutdown(self.close)
        atexit.register(self.close)
        return model, optimizer

    def _layout(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        params, sizes, seen = [], [], set()
        owned = {id(p) for p in model.parameters()}
        for gi, g in enumerate(optimizer.param_groups):
            n = 0
            for p in g["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if id(p) not in owned:
                    raise ConfigError(f"parameter group {gi} holds a tensor of shape {tuple(p.shape)} that is not a "
                                      "parameter of the model given to prepare(): build the optimizer over "
                                      "model.parameters()")
                if p.dtype != torch.float32 or p.device.type != "cpu":
                    raise ConfigError(f"ParameterServerStrategy trains float32 CPU parameters; group {gi} holds a "
                                      f"{p.dtype} tensor on {p.device} of shape {tuple(p.shape)}: keep the model "
                                      "in float32 on the CPU (use compression='fp16' to halve the bytes pushed)")
                params.append(p)
                n += p.numel()
            sizes.append(n)
        return params, sizes

    # ---- the server's side
    def _serve(self) -> None:
        server = self._server
        try:
            while True:
                req, finished = server.next_control(0.5)
                if req is not None:
                    self._control(*req)
                elif finished:
                    break
            self._server_stats = [json.loads(server.stats_json())]
        finally:
            server.stop()

    def _control(self, rid: int, kind: str, step: int, path: str, worker: int) -> None:
        server = self._server
        try:
            if kind == "save":
                message = self._save_shard(path, step)
            else:
                message = self._load_shard(path, step)
            server.complete_control(rid, True, message)
        except Exception as e:  # the worker raises it, naming this server
            server.complete_control(rid, False, f"{type(e).__name__}: {e}")

    def _shard_file(self, folder: str, step: int) -> str:
        return os.path.join(folder, f"ps-shard-{self.rank}-of-{self.num_servers}-step{step}.pt")

    def _save_shard(self, folder: str, step: int) -> str:
        server = self._server
        n = self._bounds[self.rank + 1] - self._bounds[self.rank]
        params = torch.empty(n)
        states = [torch.empty(n) for _ in range(server.state_buffers)]
        ptrs = [t.data_ptr() for t in states] + [0, 0]
        progress = server.snapshot(params.data_ptr(), ptrs[0], ptrs[1])
        file = self._shard_file(folder, step)
        checkpoint.atomic_write(file, checkpoint.serialize({
            "dtrain_ps_shard": SHARD_FORMAT, "server": self.rank, "num_servers": self.num_servers,
            "bounds": self._bounds, "step": step, "params": params, "states": states, "groups": progress}))
        return file

    def _load_shard(self, folder: str, step: int) -> str:
        file = self._shard_file(folder, step)
        if self._loaded.get(folder) == step:
            return file  # another worker loaded it already; the shard has moved on since
        try:
            shard = torch.load(file, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise ConfigError(f"server rank {self.rank} has no shard {file!r} for step {step}: the checkpoint "
                              f"was written by a job with a different number of servers, or the file was "
                              f"removed") from None
        except Exception as e:
            raise DataError(f"shard {file!r} cannot be read ({type(e).__name__}: {e})") from e
        if shard.get("dtrain_ps_shard") != SHARD_FORMAT or shard.get("bounds") != self._bounds:
            raise ConfigError(f"shard {file!r} was cut for another model or server count (bounds "
                              f"{shard.get('bounds')}, this job {self._bounds}): load it into the same model "
                              f"with num_servers={self.num_servers}")
        states = shard["states"]
        if len(states) != self._server.state_buffers:
            raise ConfigError(f"shard {file!r} holds {len(states)} optimizer state buffer(s), this server's "
                              f"optimizer keeps {self._server.state_buffers}: load it with the same optimizer")
        ptrs = [t.data_ptr() for t in states] + [0, 0]
        groups = [dict(s, **{k: g[k] for k in ("step", "momentum_started")})
                  for s, g in zip(self._slices, shard["groups"])]
        self._server.restore(shard["params"].data_ptr(), ptrs[0], ptrs[1], groups)
        self._loaded[folder] = step
        return file

    # ---- the worker's side
    def _step(self, closure=None):
        """The push/pull: starts sending this step's gradients; the next forward waits for the answer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.synchronize()
        with torch.no_grad():
            for p, g, _ in self._views:
                if p.grad is None:
                    g.zero_()
                else:
                    g.copy_(p.grad)
        lrs = [float(g["lr"]) for g in self._optimizer.param_groups]
        self._client.start(self._flat_grad.data_ptr(), self._flat_in.data_ptr(), lrs, _WIRE[self.compression])
        self._pending = True
        if not self.overlap:
            self.synchronize()
        return loss

    def synchronize(self) -> None:
        """Waits for the exchange in flight and puts the fresh parameters into the model."""
        if not self._pending:
            return
        self._pending = False
        x = self._client.wait()
        self._steps += 1
        self._leads.append(x.lead)
        self._exchange_seconds += x.seconds
        self._adopt()

    def _adopt(self) -> None:
        with torch.no_grad():
            for p, _, fresh in self._views:
                p.copy_(fresh)

    def close(self) -> None:
        """Tells the servers this worker has finished (also at exit and in dtrain.shutdown())."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self._pending:
                self._pending = False
                client.wait()
                self._adopt()
        finally:
            client.done()
            if self._hook is not None:
                self._hook.remove()

    def stats(self) -> Dict[str, Any]:
        """Per-server counters (pushes, bytes, pushes/s, bytes/s, apply GB/s, staleness histogram,
        each worker's steps) and, on a worker, its own steps and leads."""
        out: Dict[str, Any] = {"staleness": self.staleness, "num_servers": self.num_servers}
        if self._client is not None:
            self.synchronize()
            servers = [json.loads(s) for s in self._client.stats()]
        else:
            servers = self._server_stats or []
        for s in servers:
            secs = s["seconds"]
            s["pushes_per_s"] = s["pushes"] / secs if secs > 0 else 0.0
            s["bytes_per_s"] = s["push_bytes"] / secs if secs > 0 else 0.0
            s["apply_gb_per_s"] = s["applied_bytes"] / s["apply_seconds"] / 1e9 if s["apply_seconds"] > 0 else 0.0
        out["servers"] = servers
        if not self.is_server:
            out["worker"] = {"rank": self.rank, "steps": self._steps, "max_lead": max(self._leads, default=0),
                             "leads": list(self._leads), "exchange_seconds": self._exchange_seconds}
        return out

    # ---- data and checkpoints
    def distribute(self, data, batch_size: Optional[int] = None, shuffle: Optional[bool] = None,
                   seed: int = 0, drop_last: bool = False, **loader_kwargs):
        """This worker's share of `data` (sharded over the workers); nothing on a server."""
        if self.is_server:
            return []
        from dtrain.parallel.sharding import shard_loader
        from dtrain.data.dataset import TFRecordDataset
        w, n = self.worker_index, self.num_workers
        if isinstance(data, TFRecordDataset):
            return data.shard(w, n, drop_last=drop_last)
        return shard_loader(data, w, n, batch_size, shuffle, seed, drop_last, **loader_kwargs)

    def barrier(self) -> None:
        """Waits for the other workers (servers are busy serving; a no-op there)."""
        if not self.is_server:
            dtrain.barrier(group=self._worker_group)

    def reduce_metrics(self, metrics: Dict[str, Any]) -> Dict[str, float]:
        """This worker's own numbers: asynchronous workers do not wait for each other to average."""
        return {k: float(v) for k, v in sorted(metrics.items())}

    def save(self, path: str, model: Optional[torch.nn.Module] = None,
             optimizer: Optional[torch.optim.Optimizer] = None, step: Optional[int] = None, **extra) -> str:
        """On the first worker: every server writes its shard, then the main file naming them
        (atomically, in that order). On other workers and servers: returns the file name only."""
        file = checkpoint.resolve_file(path)
        if self.is_server or not self.is_main:
            return file
        if step is None:
            raise ConfigError("ParameterServerStrategy.save needs step=: shards are named by it so a crash "
                              "mid-save leaves the previous checkpoint whole")
        self.synchronize()
        folder = os.path.dirname(os.path.abspath(file))
        os.makedirs(folder, exist_ok=True)
        shards = self._client.control(_C.ps.SAVE, int(step), folder)
        payload = {
            "dtrain_format": checkpoint.FORMAT, "world_size": self.world_size, "num_servers": self.num_servers,
            "model": model.state_dict() if model is not None else None,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "step": step, "rng": [checkpoint.rng_state()], "extra": extra,
            "ps_shards": [os.path.basename(s) for s in shards],
        }
        checkpoint.atomic_write(file, checkpoint.serialize(payload))
        keep = set(payload["ps_shards"])
        for entry in os.listdir(folder):  # shards of older checkpoints, now unreferenced
            if entry.startswith("ps-shard-") and entry.endswith(".pt") and entry not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, entry))
        return file

    def load(self, path: str, model: Optional[torch.nn.Module] = None,
             optimizer: Optional[torch.optim.Optimizer] = None, strict: bool = True) -> Dict[str, Any]:
        """Restores the servers' shards (once, whichever worker asks first), then this worker's model
        buffers and RNG states, and pulls the servers' parameters. Returns {"step": step, **extra}."""
        payload = checkpoint.read(path)
        if "ps_shards" not in payload:
            raise ConfigError(f"{checkpoint.resolve_file(path)!r} was not written by ParameterServerStrategy (it "
                              "names no server shards); load it with the strategy that saved it")
        if payload.get("num_servers") != self.num_servers:
            raise ConfigError(f"the checkpoint was saved with num_servers={payload.get('num_servers')}, this job "
                              f"has {self.num_servers}: resume with the same number of servers")
        if self.is_server:
            return {"step": payload.get("step"), **payload.get("extra", {})}
        self.synchronize()
        folder = os.path.dirname(os.path.abspath(checkpoint.resolve_file(path)))
        self._client.control(_C.ps.LOAD, int(payload["step"]), folder)
        out = checkpoint.restore(payload, 0, model, None, strict=strict)
        if optimizer is not None and payload.get("optimizer") is not None:
            saved = payload["optimizer"]
            for g, s in zip(optimizer.param_groups, saved.get("param_groups", [])):
                g.update({k: v for k, v in s.items() if k != "params"})  # hyper-parameters (a scheduler's lr)
        self._client.pull(self._flat_in.data_ptr())
        self._adopt()
        return out


def _before_shutdown(fn) -> None:
    """Runs `fn` at the start of dtrain.shutdown() (workers tell the servers they are done
    before the world's closing barrier, which the servers reach only after that)."""
    from dtrain.comm import api
    api.register_before_shutdown(fn)


__all__ = ["ParameterServerStrategy"]
