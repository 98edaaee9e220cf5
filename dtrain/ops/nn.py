"""Fused bias+GELU and LayerNorm with their backward, as autograd Functions.

    y = ops.fused_bias_gelu(x, bias)                      # gelu(x + bias), exact (erf) GELU
    y = ops.fused_layer_norm(x, weight, bias, eps=1e-5)   # over the last dimension

One pass over memory forward and one backward (the bias and weight gradients are
summed in the same pass as the input's). CPU float32 and float64 tensors run the C++
kernels; CUDA float32, float16 and bfloat16 tensors the CUDA kernels (built in, or
compiled at run time through CuPy); anything else, or CUDA with neither kernel path,
takes torch's own ops, with the same results.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from dtrain.errors import ConfigError
from dtrain.ops import _cuda


def _k():
    from dtrain import _C
    return _C.kernels


def _dt(t: torch.Tensor):
    from dtrain import _C
    return _C.DType.float64 if t.dtype == torch.float64 else _C.DType.float32


def _ours(*ts: Optional[torch.Tensor]) -> bool:
    """Whether dtrain's kernels take these tensors (else torch's ops run)."""
    first = ts[0]
    if not all(t is None or (t.dtype == first.dtype and t.device == first.device and not t.is_neg()) for t in ts):
        return False  # (a negated view's memory holds the negation of its values: torch's ops resolve it)
    if first.device.type == "cpu":
        return first.dtype in (torch.float32, torch.float64)
    return (first.device.type == "cuda" and first.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and _cuda.backend("fused ops", required=False) is not None)


def _cuda_dt(t: torch.Tensor):
    from dtrain import _C
    return {torch.float32: _C.DType.float32, torch.float16: _C.DType.float16,
            torch.bfloat16: _C.DType.bfloat16}[t.dtype]


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _col_part(rows: int, n: int, t: torch.Tensor, count: int = 1) -> torch.Tensor:
    """Scratch for a CUDA column reduction: `count` blocks of colChunks(rows) x n floats."""
    return torch.empty(count * _k().cuda_col_chunks(rows) * max(n, 1), dtype=torch.float32, device=t.device)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class _BiasGelu(torch.autograd.Function):
    """forward: gelu(x + bias); backward: dx = dy * gelu'(x + bias), dbias = sum of dx over rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        bias = bias.contiguous()
        y = torch.empty_like(x)
        n = bias.numel()
        rows = x.numel() // max(n, 1)
        if x.is_cuda:
            _cuda.backend("fused_bias_gelu").gelu_forward_cuda(_cuda_dt(x), x.data_ptr(), bias.data_ptr(),
                                                               y.data_ptr(), rows, n, _stream(x))
        else:
            _k().gelu_forward(_dt(x), x.data_ptr(), bias.data_ptr(), y.data_ptr(), rows, n, torch.get_num_threads())
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x, bias = ctx.saved_tensors
        dy = dy.resolve_neg().contiguous()  # a negated view's memory holds -dy
        dx = torch.empty_like(x)
        db = torch.empty_like(bias)
        n = bias.numel()
        rows = x.numel() // max(n, 1)
        if x.is_cuda:
            part = _col_part(rows, n, x)
            _cuda.backend("fused_bias_gelu").gelu_backward_cuda(
                _cuda_dt(x), dy.data_ptr(), x.data_ptr(), bias.data_ptr(), dx.data_ptr(), db.data_ptr(),
                part.data_ptr(), rows, n, _stream(x))
        else:
            _k().gelu_backward(_dt(x), dy.data_ptr(), x.data_ptr(), bias.data_ptr(), dx.data_ptr(), db.data_ptr(),
                               rows, n, torch.get_num_threads())
        return dx, db


def fused_bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) (exact GELU, as F.gelu's default) with bias over the last dimension.

    Raises ConfigError when bias is not 1-D with x's last dimension's size.

    Example::

        h = ops.fused_bias_gelu(x @ w1, b1)     # x @ w1: [tokens, 4096], b1: [4096]
    """
    if bias.dim() != 1 or x.dim() == 0 or x.shape[-1] != bias.numel():
        raise ConfigError(f"fused_bias_gelu needs a 1-D bias as long as x's last dimension: x {tuple(x.shape)}, "
                          f"bias {tuple(bias.shape)}")
    if not _ours(x, bias):
        return F.gelu(x + bias)
    return _BiasGelu.apply(x, bias)


# Below this many elements of x, fused_layer_norm hands CPU tensors to torch's own kernel: there
# a Python autograd Function's overhead (~60 us a forward and backward, against ~30 us for
# torch's C++ one) outweighs what the fused kernel saves. fwd+bwd against F.layer_norm, one
# and two threads: [64, 1024] 0.74-0.84x, [256, 1024] 0.97-1.00x, [512, 1024] 1.04-1.14x,
# [4096, 1024] 1.25-1.6x. (bias+GELU is ahead of torch's two ops at every size measured.)
# The tests set it to 0, to check the kernels on small shapes.
TORCH_BELOW = 1 << 18


class _LayerNorm(torch.autograd.Function):
    """forward: (x - mean) * rstd * weight + bias per row; backward: dx, dweight, dbias in one pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n = weight.numel() if weight is not None else x.shape[-1]
        x = x.contiguous()
        rows = x.numel() // max(n, 1)
        y = torch.empty_like(x)
        stat = torch.float32 if x.is_cuda else x.dtype  # per-row mean and 1/std
        mean = torch.empty(rows, dtype=stat, device=x.device)
        rstd = torch.empty(rows, dtype=stat, device=x.device)
        w = weight.contiguous() if weight is not None else None
        b = bias.contiguous() if bias is not None else None
        if w is None and b is not None:  # the CPU kernel scales before it shifts
            w = torch.ones(n, dtype=x.dtype, device=x.device)
        if x.is_cuda:
            _cuda.backend("fused_layer_norm").layer_norm_forward_cuda(
                _cuda_dt(x), x.data_ptr(), _ptr(w), _ptr(b), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), rows,
                n, float(eps), _stream(x))
        else:
            _k().layer_norm_forward(_dt(x), x.data_ptr(), _ptr(w), _ptr(b), y.data_ptr(), mean.data_ptr(),
                                    rstd.data_ptr(), rows, n, float(eps), torch.get_num_threads())
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.has = (weight is not None, bias is not None)
        ctx.n = n
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        dy = dy.resolve_neg().contiguous()  # a negated view's memory holds -dy
        dx = torch.empty_like(x)
        need_w = ctx.has[0] and ctx.needs_input_grad[1]
        need_b = ctx.has[1] and ctx.needs_input_grad[2]
        dw = torch.empty(ctx.n, dtype=x.dtype, device=x.device) if need_w else None
        db = torch.empty(ctx.n, dtype=x.dtype, device=x.device) if need_b else None
        rows = mean.numel()
        if x.is_cuda:
            part = _col_part(rows, ctx.n, x, 2)
            _cuda.backend("fused_layer_norm").layer_norm_backward_cuda(
                _cuda_dt(x), dy.data_ptr(), x.data_ptr(), _ptr(w), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                _ptr(dw), _ptr(db), part.data_ptr(), rows, ctx.n, _stream(x))
        else:
            _k().layer_norm_backward(_dt(x), dy.data_ptr(), x.data_ptr(), _ptr(w), mean.data_ptr(),
                                     rstd.data_ptr(), dx.data_ptr(), _ptr(dw), _ptr(db), rows, ctx.n,
                                     torch.get_num_threads())
        return dx, dw, db, None


def fused_layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm(x, weight.shape, weight, bias, eps) over the last dimension, fused.

    weight and bias are 1-D (either may be None). Raises ConfigError when their size is
    not x's last dimension. CPU inputs under TORCH_BELOW elements (256K) run torch's own
    kernel, which is faster there.
    """
    n = x.shape[-1] if x.dim() else 0
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.numel() != n):
            raise ConfigError(f"fused_layer_norm normalises x's last dimension ({n}); {name} has shape "
                              f"{tuple(t.shape)}")
    if x.dim() == 0 or n == 0 or (x.numel() < TORCH_BELOW and x.is_cpu) or not _ours(x, weight, bias):
        return F.layer_norm(x, (n,), weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, eps)
