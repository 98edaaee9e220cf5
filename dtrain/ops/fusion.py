"""Tensor fusion: many tensors into one flat buffer and back, with a cast and a scale
in the same pass, and norms over many tensors in one pass.

    flat = ops.pack(grads, dtype=torch.float16, scale=1 / world)   # one buffer for the wire
    ops.unpack(flat, grads, scale=1.0)                              # cast back into each grad
    total = ops.clip_grad_norm_(model.parameters(), max_norm=1.0)   # as torch.nn.utils'
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Union

import torch

from dtrain.errors import ConfigError
from dtrain.ops import _cuda, _torch_reader

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _k():
    from dtrain import _C
    return _C.kernels


_DTYPES: dict = {}  # torch dtype -> _C.DType, filled on first use
_reader_bound: Optional[bool] = None


def _dt(dtype: torch.dtype):
    if not _DTYPES:
        from dtrain import _C
        _DTYPES.update({torch.float32: _C.DType.float32, torch.float16: _C.DType.float16,
                        torch.bfloat16: _C.DType.bfloat16})
    return _DTYPES[dtype]


def _read(tensors: Sequence[torch.Tensor]):
    """The tensors as a _C.kernels.TensorList, read in one C++ loop, or None when one of
    them needs _gather's checks (not a contiguous float CPU tensor). Per-tensor attribute
    reads from Python are most of a small pack's time (csrc/bindings/tensor_list.h)."""
    global _reader_bound
    if _reader_bound is None:
        _dt(torch.float32)
        _reader_bound = _k().bind_tensor_type(torch.Tensor, torch.nn.Parameter, dict(_DTYPES))
        if _reader_bound:
            _torch_reader.start(_k().use_torch_reader)  # reads through torch's C++ objects once built
    return _k().read_tensors(tensors) if _reader_bound else None


def _threads(threads: Optional[int]) -> int:
    return threads or torch.get_num_threads()


def _check(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Float tensors on one device the kernels run on. (Kept cheap: it runs per call, per
    tensor, and torch.device objects are built anew on each .device access.)"""
    if not tensors:
        return
    first = tensors[0]
    cpu = isinstance(first, torch.Tensor) and first.is_cpu
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{what}: item {i} is a {type(t).__name__}, not a tensor")
        if t.dtype not in _FLOATS:
            raise ConfigError(f"{what}: tensor {i} is {t.dtype}; these kernels take float32, float16 and bfloat16")
        if t.is_cpu != cpu or (not cpu and t.device != first.device):
            raise ConfigError(f"{what}: tensor {i} is on {t.device}, tensor 0 on {first.device}; one device per call")
    if not cpu:
        if first.device.type != "cuda":
            raise ConfigError(f"{what}: tensors are on {first.device}; the kernels run on CPU and CUDA tensors")
        _cuda.backend(what)


def _runs(tensors: Sequence[torch.Tensor]) -> List[Sequence[torch.Tensor]]:
    """Runs of consecutive tensors sharing a dtype (one kernel call each)."""
    if not tensors:
        return []
    dt = tensors[0].dtype
    if all(t.dtype == dt for t in tensors):
        return [tensors]
    out, start = [], 0
    for i in range(1, len(tensors) + 1):
        if i == len(tensors) or tensors[i].dtype != tensors[start].dtype:
            out.append(tensors[start:i])
            start = i
    return out


def _gather(tensors: Sequence[torch.Tensor], what: str, copy: bool):
    """One pass over the tensors: checks them as _check does and returns their runs of one
    dtype as (dtype, pointers, sizes), plus contiguous copies to keep alive (copy=True; with
    copy=False a non-contiguous tensor raises, for in-place writes). Per-tensor attribute
    reads are the cost of a small pack, so each is read once."""
    runs, keep = [], []
    if not tensors:
        return runs, keep
    first = tensors[0]
    cpu = isinstance(first, torch.Tensor) and first.is_cpu
    dtype, ptrs, sizes = None, None, None
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{what}: item {i} is a {type(t).__name__}, not a tensor")
        dt = t.dtype
        if dt is not dtype:
            if dt not in _FLOATS:
                raise ConfigError(f"{what}: tensor {i} is {dt}; these kernels take float32, float16 and bfloat16")
            dtype, ptrs, sizes = dt, [], []
            runs.append((dt, ptrs, sizes))
        if t.is_cpu != cpu or (not cpu and t.device != first.device):
            raise ConfigError(f"{what}: tensor {i} is on {t.device}, tensor 0 on {first.device}; one device per call")
        if not t.is_contiguous():
            if not copy:
                raise ConfigError(f"{what} writes in place, so tensor {i} (shape {tuple(t.shape)}) must be "
                                  "contiguous")
            t = t.contiguous()
            keep.append(t)
        if t.is_neg():  # a negated view: its memory holds the values' negation
            if not copy:
                raise ConfigError(f"{what} writes in place, so tensor {i} must not be a negated view "
                                  "(is_neg(): it shares its base's memory, holding the negation); pass "
                                  "t.resolve_neg() and copy the result back")
            t = t.resolve_neg()
            keep.append(t)
        ptrs.append(t.data_ptr())
        sizes.append(t.numel())
    if not cpu:
        _check([first], what)  # the device checks (CUDA, a kernel path for it)
    return runs, keep


def pack(tensors: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None, scale: float = 1.0,
         out: Optional[torch.Tensor] = None, threads: Optional[int] = None) -> torch.Tensor:
    """All tensors, flattened back to back into one 1-D tensor of `dtype` (default: the
    first tensor's), each element multiplied by `scale`, in one pass over memory.

    Raises ConfigError for non-float tensors, tensors on several devices, or an `out` of
    the wrong size, dtype or device.
    """
    if not isinstance(tensors, (list, tuple)):
        tensors = list(tensors)
    fast = _read(tensors)  # contiguous float CPU tensors: read in C++
    if fast is not None:
        runs, keep, total = None, None, fast.total
    else:
        runs, keep = _gather(tensors, "pack", copy=True)  # keep: copies alive until the kernel ran
        total = sum(sum(sizes) for _, _, sizes in runs)
    dtype = dtype or (tensors[0].dtype if tensors else torch.float32)
    if dtype not in _FLOATS:
        raise ConfigError(f"pack casts to float32, float16 or bfloat16, not {dtype}")
    cpu = not tensors or tensors[0].is_cpu
    if out is None:
        out = torch.empty(total, dtype=dtype, device=None if cpu else tensors[0].device)
    elif (out.dtype != dtype or out.numel() != total or not out.is_contiguous()
          or (not out.is_cpu if cpu else out.device != tensors[0].device)):
        device = "cpu" if cpu else tensors[0].device
        raise ConfigError(f"pack's out must be a contiguous {dtype} tensor of {total} elements on {device}, got "
                          f"{out.dtype} with {out.numel()} on {out.device}")
    else:
        torch._C._increment_version((out,))  # written through its pointer below, as cat(out=) would count it
    if fast is not None:
        _k().pack_list(fast, out.data_ptr(), _dt(dtype), float(scale), _threads(threads))
        return out
    offset, esize = 0, out.element_size()
    for run_dtype, ptrs, sizes in runs:
        args = (ptrs, sizes, _dt(run_dtype), out.data_ptr() + offset * esize, _dt(dtype), float(scale))
        if not cpu:
            _cuda.backend("pack").pack_cuda(*args, torch.cuda.current_stream(out.device).cuda_stream)
        else:
            _k().pack(*args, _threads(threads))
        offset += sum(sizes)
    del keep
    return out


def unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0, accumulate: bool = False,
           threads: Optional[int] = None) -> None:
    """Writes `flat` (as pack() laid it out) back into the tensors, cast to each one's dtype
    and multiplied by `scale`; with accumulate=True adds into them instead.

    Raises ConfigError when flat's size is not the tensors' total or a tensor is not contiguous.
    """
    if not isinstance(tensors, (list, tuple)):
        tensors = list(tensors)
    _check([flat], "unpack")
    fast = _read(tensors) if flat.is_cpu else None
    if fast is not None:
        runs, total = None, fast.total
    else:
        runs, _ = _gather(tensors, "unpack", copy=False)
        total = sum(sum(sizes) for _, _, sizes in runs)
    if tensors and (flat.is_cpu != tensors[0].is_cpu or (not flat.is_cpu and flat.device != tensors[0].device)):
        raise ConfigError(f"unpack: flat is on {flat.device}, the tensors on {tensors[0].device}; one device per call")
    if flat.numel() != total or not flat.is_contiguous():
        raise ConfigError(f"unpack's flat tensor has {flat.numel()} elements (contiguous: {flat.is_contiguous()}); "
                          f"the tensors hold {total}")
    torch._C._increment_version(tensors)  # written through their pointers below, as copy_/add_ would count them
    if fast is not None:
        _k().unpack_list(flat.data_ptr(), _dt(flat.dtype), fast, float(scale), bool(accumulate), _threads(threads))
        return
    offset, esize = 0, flat.element_size()
    for run_dtype, ptrs, sizes in runs:
        args = (flat.data_ptr() + offset * esize, _dt(flat.dtype), ptrs, sizes, _dt(run_dtype), float(scale),
                bool(accumulate))
        if flat.device.type == "cuda":
            _cuda.backend("unpack").unpack_cuda(*args, torch.cuda.current_stream(flat.device).cuda_stream)
        else:
            _k().unpack(*args, _threads(threads))
        offset += sum(sizes)


def multi_tensor_norm(tensors: Sequence[torch.Tensor], norm_type: float = 2.0,
                      threads: Optional[int] = None) -> torch.Tensor:
    """The norm of all tensors' elements together (2: sqrt of the summed squares, computed
    in double; inf: the largest |x|), as a float32 scalar tensor. NaN if any element is NaN."""
    if not isinstance(tensors, (list, tuple)):
        tensors = list(tensors)
    norm_type = float(norm_type)
    return _norm(tensors, norm_type, threads, _read(tensors) if norm_type in (2.0, math.inf) else None)


def _norm(tensors: Sequence[torch.Tensor], norm_type: float, threads: Optional[int], fast) -> torch.Tensor:
    """multi_tensor_norm, given the tensors already read by _read (or None: its checks)."""
    if fast is not None and norm_type in (2.0, math.inf):
        return _norm_of(*_k().norm_list(fast, _threads(threads)), norm_type)
    tensors = [t.resolve_neg().contiguous() for t in tensors]  # the kernels read memory as it lies
    _check(tensors, "multi_tensor_norm")
    if norm_type not in (2.0, math.inf):  # other orders: torch's norms, per tensor then together
        if not tensors:
            return torch.tensor(0.0)
        norms = torch.stack([torch.linalg.vector_norm(t.float(), norm_type) for t in tensors])
        return torch.linalg.vector_norm(norms, norm_type)
    if tensors and tensors[0].is_cuda:
        return _cuda_norm(tensors, norm_type == math.inf)
    sum_sq, max_abs, nan = 0.0, 0.0, False
    for run in _runs(tensors):
        s, m, n = _k().norm([t.data_ptr() for t in run], [t.numel() for t in run], _dt(run[0].dtype),
                            _threads(threads))
        sum_sq, max_abs, nan = sum_sq + s, max(max_abs, m), nan or n
    return _norm_of(sum_sq, max_abs, nan, norm_type)


def _norm_of(sum_sq: float, max_abs: float, nan: bool, norm_type: float) -> torch.Tensor:
    if nan:
        return torch.tensor(float("nan"))
    return torch.tensor(math.sqrt(sum_sq) if norm_type == 2.0 else max_abs, dtype=torch.float32)


def _cuda_norm(tensors: Sequence[torch.Tensor], inf: bool) -> torch.Tensor:
    """The norm on the device, left there (as torch's clip_grad_norm_ does: no host sync)."""
    from dtrain import _C
    dev = tensors[0].device
    out = torch.empty((), dtype=torch.float32, device=dev)
    total = _C.kernels.cuda_total_blocks([t.numel() for t in tensors])
    part_sq = torch.empty(max(total, 1), dtype=torch.float64, device=dev)
    part_max = torch.empty(max(total, 1), dtype=torch.float32, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    kern = _cuda.backend("multi_tensor_norm")
    runs = _runs(tensors)
    if len(runs) == 1:
        kern.norm_cuda([t.data_ptr() for t in tensors], [t.numel() for t in tensors], _dt(tensors[0].dtype),
                       part_sq.data_ptr(), part_max.data_ptr(), inf, out.data_ptr(), stream)
        return out
    parts = []  # one norm per dtype run, then their norm
    for run in runs:
        kern.norm_cuda([t.data_ptr() for t in run], [t.numel() for t in run], _dt(run[0].dtype), part_sq.data_ptr(),
                       part_max.data_ptr(), inf, out.data_ptr(), stream)
        parts.append(out.clone())
    return torch.linalg.vector_norm(torch.stack(parts), math.inf if inf else 2.0)


def clip_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ with the norm taken in one pass per dtype: scales
    every grad by min(1, max_norm / (total_norm + 1e-6)) and returns the total norm. On the
    CPU, where reading the factor costs no device sync, a factor of exactly 1 skips the
    scaling, and contiguous float grads are scaled by one multi-tensor kernel."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    fast = _read(grads)  # contiguous float CPU grads: read once, for the norm and the scaling
    total = _norm(grads, norm_type, None, fast)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
                           "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
                           "by the non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)  # float32, as torch computes it
    if not total.is_cpu:
        torch._foreach_mul_(grads, coef)  # stays on the device: no sync
        return total
    c = coef.item()
    if c == 1.0:
        return total  # x * 1.0 is x, bit for bit: the pass over every gradient changes nothing
    if fast is not None and _k().scale_list(fast, c, _threads(None)):
        torch._C._increment_version(grads)  # written through pointers: autograd's counters, as torch's mul_ would
    else:
        torch._foreach_mul_(grads, coef)
    return total
