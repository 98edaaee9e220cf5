"""Drop-in torch.optim optimizers whose step is one multi-tensor C++ call.

    opt = dtrain.optim.FusedAdam(model.parameters(), lr=1e-3)   # as torch.optim.Adam
    loss.backward(); opt.step(); opt.zero_grad()

Same hyper-parameters, defaults, param groups and state_dict layout as torch's
Adam, AdamW and SGD: a state_dict saved by one loads into the other. The update is
computed in float32 for float32, float16 and bfloat16 parameters (state stays in the
parameter's dtype, as torch keeps it), vectorised and split over threads.

Mixed precision: torch.amp.GradScaler drives these optimizers directly (they unscale
inside the kernel and skip a step whose grads overflowed), and `check_finite=True`
makes every step check its grads for inf/NaN first and skip (counted in
`skipped_steps`) rather than spoil the parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from dtrain.errors import ConfigError
from dtrain.ops import _cuda

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels():
    from dtrain import _C
    return _C.kernels


def _dtype(t: torch.Tensor):
    from dtrain import _C
    return {torch.float32: _C.DType.float32, torch.float16: _C.DType.float16,
            torch.bfloat16: _C.DType.bfloat16}[t.dtype]


class _FusedOptimizer(torch.optim.Optimizer):
    """Grouping, checks, AMP and step counting shared by the fused optimizers."""

    _step_supports_amp_scaling = True  # GradScaler sets grad_scale/found_inf instead of unscaling

    def __init__(self, params, defaults: Dict[str, Any], check_finite: bool, threads: Optional[int]):
        if threads is not None and not (isinstance(threads, int) and threads >= 1):
            raise ConfigError(f"threads must be a positive int or None (torch's intra-op threads), got {threads!r}")
        super().__init__(params, defaults)
        self.check_finite = bool(check_finite)
        self.threads = threads
        self.skipped_steps = 0
        self._plans: Dict[tuple, tuple] = {}  # (group index, ids of params with grads) -> (generation, batches)
        self._generation = 0

    def _check_param(self, p: torch.Tensor, group_index: int) -> None:
        if p.dtype not in _DTYPES:
            raise ConfigError(f"{type(self).__name__} updates float32, float16 and bfloat16 parameters; param group "
                              f"{group_index} holds a {p.dtype} parameter of shape {tuple(p.shape)}. Use torch.optim "
                              f"for it (a separate optimizer), or convert the model")
        if p.device.type == "cuda":
            _cuda.backend(f"{type(self).__name__} (a parameter is on {p.device})")
        if p.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"{type(self).__name__} runs on CPU and CUDA tensors, not {p.device}")
        if not p.is_contiguous():
            raise ConfigError(f"{type(self).__name__} needs contiguous parameters; one of shape {tuple(p.shape)} "
                              f"(strides {p.stride()}) is not. Make it contiguous before building the optimizer")
        if p.grad.is_sparse:
            raise ConfigError(f"{type(self).__name__} does not take sparse gradients (shape {tuple(p.shape)}); "
                              "use torch.optim.SparseAdam")

    def _amp(self) -> Tuple[float, bool]:
        """(factor grads are multiplied by, whether GradScaler found inf/NaN this step)."""
        scale = getattr(self, "grad_scale", None)
        found = getattr(self, "found_inf", None)
        skip = found is not None and float(found) > 0
        return (1.0 if scale is None else 1.0 / float(scale)), skip

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One update of every parameter that has a grad. Returns the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inv_scale, skip = self._amp()
        if skip:
            self.skipped_steps += 1
            return loss
        threads = self.threads or torch.get_num_threads()
        calls: List[_Batch] = []
        for gi, group in enumerate(self.param_groups):
            live = [p for p in group["params"] if p.grad is not None]
            key = (gi, tuple(map(id, live)))
            plan = self._plans.get(key)
            if plan is None or plan[0] != self._generation:
                batches = self._plan(gi, group, live)
                plan = self._plans[key] = (self._generation, batches)
            calls += plan[1]
        grads = [self._grads(b) for b in calls]
        # One kernel call checks its grads itself before updating; with several, all are
        # checked first so that a skipped step leaves every parameter alone.
        check = self.check_finite and len(calls) == 1 and calls[0].key[0].type == "cpu"
        if self.check_finite and not check:
            if any(not torch.isfinite(g).all() for gs in grads for g in gs):
                self.skipped_steps += 1
                return loss
        for b, gs in zip(calls, grads):
            if self._update(b, [g.data_ptr() for g in gs], inv_scale, threads, check):
                self.skipped_steps += 1
            else:
                # The kernels write through data pointers, which autograd cannot see: tell it,
                # as torch's own in-place ops do, so a graph that saved a parameter before this
                # step raises "modified by an inplace operation" at backward instead of
                # differentiating the new values.
                torch._C._increment_version(b.params)
        return loss

    def _plan(self, gi: int, group: Dict[str, Any], live: List[torch.Tensor]) -> List["_Batch"]:
        """Checks the group's parameters that have grads, makes missing state, and cuts them
        into kernel calls (same dtype, same step). Cached until the set of parameters with
        grads changes or any plan is rebuilt (building one re-homes step counters)."""
        self._generation += 1
        by_key: Dict[tuple, List[torch.Tensor]] = {}
        for p in live:
            self._check_param(p, gi)
            st = self.state[p]
            if not st:
                self._init_state(p, st, group)
            by_key.setdefault((p.device,) + self._key(p, st), []).append(p)
        batches = []
        for key, params in by_key.items():
            names = self._state_names(group, key)
            for p in params:
                for n in names:
                    _check_state(self.state[p][n], p, n)
            b = _Batch(group, key, params, _dtype(params[0]))
            b.fixed = [[p.data_ptr() for p in params]] + [[self.state[p][n].data_ptr() for p in params]
                                                          for n in names]
            self._adopt(b)
            batches.append(b)
        return batches

    def _grads(self, b: "_Batch") -> List[torch.Tensor]:
        out = []
        for p in b.params:
            g = p.grad
            if g.dtype != p.dtype or not g.is_contiguous() or g.shape != p.shape:
                if g.is_sparse:
                    raise ConfigError(f"{type(self).__name__} does not take sparse gradients (shape "
                                      f"{tuple(p.shape)}); use torch.optim.SparseAdam")
                if g.shape != p.shape:
                    raise ConfigError(f"a grad of shape {tuple(g.shape)} belongs to a parameter of shape "
                                      f"{tuple(p.shape)}")
                g = p.grad = g.to(p.dtype).contiguous()  # rare: a fixed copy the kernel can read
            out.append(g)
        return out

    def _adopt(self, b: "_Batch") -> None:
        """Hook for a new batch (Adam gathers its step counters)."""

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._plans.clear()
        self._generation += 1

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_plans"):
            self._plans.clear()

    # subclasses: _init_state(p, state, group); _key(p, state) -> tuple, equal for the params one
    # kernel call updates; _state_names(group, key); _update(batch, grad_ptrs, inv_scale, threads,
    # check) -> True if it skipped


class _Batch:
    """The parameters one kernel call updates, with their fixed pointers."""

    def __init__(self, group, key, params, dtype):
        self.group, self.key, self.params, self.dtype = group, key, params, dtype
        self.numel = [p.numel() for p in params]
        self.fixed: List[List[int]] = []  # param, then state pointers, slot by slot (grads come per step)
        self.steps: Optional[torch.Tensor] = None  # Adam: the batch's step counters in one buffer
        self.step = 0

    def slots(self, grad_ptrs: List[int]) -> List[List[int]]:
        return [self.fixed[0], grad_ptrs] + self.fixed[1:]


class FusedAdam(_FusedOptimizer):
    """torch.optim.Adam's update (lr, betas, eps, weight_decay as L2, amsgrad, maximize)
    in one multi-tensor CPU kernel call per parameter group.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.Adam.
        check_finite: skip (and count in skipped_steps) a step whose grads hold inf/NaN.
        threads: threads for the kernel (default torch.get_num_threads()).

    Example::

        opt = FusedAdam(model.parameters(), lr=1e-3, weight_decay=1e-2)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    """

    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 check_finite: bool = False, threads: Optional[int] = None):
        _check_hyper(lr=lr, eps=eps, weight_decay=weight_decay)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {betas!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=None, capturable=False, differentiable=False, fused=None)
        if self._decoupled:
            defaults["decoupled_weight_decay"] = True
        super().__init__(params, defaults, check_finite, threads)

    def _init_state(self, p, st, group):
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if group["amsgrad"]:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def _key(self, p, st):
        if "max_exp_avg_sq" not in st and any(g["amsgrad"] and any(q is p for q in g["params"])
                                              for g in self.param_groups):
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)  # switched on later
        return (p.dtype, int(st["step"].item()))

    def _state_names(self, group, key):
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])

    def _adopt(self, b):
        # The batch's step counters become 0-d views of one buffer: one add per step counts
        # them all, and each parameter's state still holds its own "step" tensor, as torch's.
        b.step = b.key[2]
        b.steps = torch.full((len(b.params),), float(b.step), dtype=torch.float32)  # on the CPU, as torch keeps them
        for i, p in enumerate(b.params):
            self.state[p]["step"] = b.steps[i]

    def _update(self, b, grad_ptrs, inv_scale, threads, check):
        k = _kernels()
        group = b.group
        step = b.step + 1
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        decoupled = self._decoupled or group.get("decoupled_weight_decay", False)
        if wd == 0:
            decay = k.Decay.none
        else:
            decay = k.Decay.decoupled if decoupled else k.Decay.l2
        # The scalars as torch computes them (Python floats, double precision).
        bias1 = 1 - beta1 ** step
        bias2 = 1 - beta2 ** step
        args = (b.slots(grad_ptrs), b.numel, b.dtype, decay, bool(group["amsgrad"]),
                -inv_scale if group["maximize"] else inv_scale, 1 - beta1, beta2, 1 - beta2, eps, wd, 1 - lr * wd,
                -(lr / bias1), 1 / math.sqrt(bias2))
        if b.key[0].type == "cuda":  # launched on torch's current stream; found_inf was read above
            _cuda.backend("FusedAdam").adam_step_cuda(*args, 0, torch.cuda.current_stream(b.key[0]).cuda_stream)
            found = False
        else:
            found = k.adam_step(*args, check, threads)
        if not found:
            b.step = step
            b.steps.add_(1.0)
        return found


class FusedAdamW(FusedAdam):
    """torch.optim.AdamW's update (decoupled weight decay, default 1e-2) in one
    multi-tensor CPU kernel call per parameter group. Arguments as FusedAdam."""

    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 check_finite: bool = False, threads: Optional[int] = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         check_finite=check_finite, threads=threads)


class FusedSGD(_FusedOptimizer):
    """torch.optim.SGD's update (momentum, dampening, nesterov, weight_decay, maximize)
    in one multi-tensor CPU kernel call per parameter group.

    Example::

        opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 check_finite: bool = False, threads: Optional[int] = None):
        _check_hyper(lr=lr, weight_decay=weight_decay, momentum=momentum)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError(f"nesterov momentum needs momentum > 0 and dampening = 0, got momentum={momentum}, "
                              f"dampening={dampening}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=None, differentiable=False, fused=None)
        super().__init__(params, defaults, check_finite, threads)

    def _init_state(self, p, st, group):
        st["momentum_buffer"] = None  # made from the first grad, as torch does

    def _key(self, p, st):
        return (p.dtype, st.get("momentum_buffer") is None)

    def _state_names(self, group, key):
        return [] if group["momentum"] == 0 or key[2] else ["momentum_buffer"]

    def _update(self, b, grad_ptrs, inv_scale, threads, check):
        k = _kernels()
        group = b.group
        mom, first = group["momentum"], b.key[2]
        slots = b.slots(grad_ptrs)
        if mom == 0:
            mode = k.Momentum.none
        elif first:  # the buffers start as this step's grads; the plan is rebuilt after
            bufs = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in b.params]
            slots.append([t.data_ptr() for t in bufs])
            mode = k.Momentum.first
        else:
            mode = k.Momentum.later
        wd = group["weight_decay"]
        args = (slots, b.numel, b.dtype, wd != 0, mode, bool(group["nesterov"]),
                -inv_scale if group["maximize"] else inv_scale, wd, mom, 1 - group["dampening"], -group["lr"])
        if b.key[0].type == "cuda":
            _cuda.backend("FusedSGD").sgd_step_cuda(*args, 0, torch.cuda.current_stream(b.key[0]).cuda_stream)
            found = False
        else:
            found = k.sgd_step(*args, check, threads)
        if mode == k.Momentum.first and not found:
            for p, t in zip(b.params, bufs):
                self.state[p]["momentum_buffer"] = t
            self._generation += 1  # the state changed: plans made before are stale
        return found


def _check_state(t: torch.Tensor, p: torch.Tensor, name: str) -> None:
    if t.shape != p.shape or t.dtype != p.dtype or not t.is_contiguous() or t.device != p.device:
        raise ConfigError(f"optimizer state '{name}' ({tuple(t.shape)}, {t.dtype}, {t.device}) does not match its "
                          f"parameter ({tuple(p.shape)}, {p.dtype}, {p.device}); was a state_dict loaded for "
                          "another model?")


def _check_hyper(**values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
