"""Reduce and wire-conversion kernels against torch, on every instruction set this CPU has."""

import pytest
import torch

from dtrain import _C

ISAS = [isa for isa in ("generic", "avx2", "avx512") if _C.set_kernel_isa(isa)]
WIRE = {"fp16": (_C.DType.float16, torch.float16), "bf16": (_C.DType.bfloat16, torch.bfloat16)}
DT = {torch.float32: _C.DType.float32, torch.float64: _C.DType.float64, torch.float16: _C.DType.float16,
      torch.bfloat16: _C.DType.bfloat16, torch.int32: _C.DType.int32, torch.int64: _C.DType.int64,
      torch.uint8: _C.DType.uint8}


@pytest.fixture(params=ISAS)
def isa(request):
    assert _C.set_kernel_isa(request.param)
    yield request.param
    for best in ("avx512", "avx2", "generic"):
        if _C.set_kernel_isa(best):
            break


def special_floats(n):
    """Random normals plus the values conversions get wrong: 0, -0, inf, NaN, subnormals, overflow, ties."""
    x = torch.randn(n) * torch.exp2(torch.randint(-30, 20, (n,)).float())
    extra = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65520.0, 65519.0,
                          1e-8, -3e-7, 6.1e-5, 2.0**-24, 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11,
                          3.4e38, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])
    return torch.cat([extra, x])[:n] if n < len(extra) else torch.cat([extra, x[len(extra):]])


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
@pytest.mark.parametrize("n", [0, 1, 7, 15, 16, 17, 1031, 100003])
def test_encode_matches_torch_bit_for_bit(isa, wire, n):
    code, tdt = WIRE[wire]
    x = special_floats(n)
    out = torch.empty(n, dtype=tdt)
    _C.encode_wire(code, out.data_ptr(), x.data_ptr(), n)
    ref = x.to(tdt)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
@pytest.mark.parametrize("n", [0, 1, 9, 100003])
def test_decode_matches_torch(isa, wire, n):
    code, tdt = WIRE[wire]
    h = torch.randint(-32768, 32767, (n,), dtype=torch.int16).view(tdt)
    out = torch.empty(n)
    _C.decode_wire(code, out.data_ptr(), h.data_ptr(), n)
    ref = h.float()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan], ref[~nan])


def sample(dtype, n, g):
    if dtype.is_floating_point:
        return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    if dtype == torch.uint8:
        return torch.randint(0, 250, (n,), generator=g, dtype=torch.int64).to(dtype)
    return torch.randint(-1000, 1000, (n,), generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("op", ["sum", "min", "max", "prod"])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_reduce_matches_torch(isa, dtype, op, n):
    g = torch.Generator().manual_seed(n)
    a, b = sample(dtype, n, g), sample(dtype, n, g)
    expect = {"sum": lambda: a + b, "min": lambda: torch.minimum(a, b), "max": lambda: torch.maximum(a, b),
              "prod": lambda: a * b}[op]()
    got = a.clone()
    _C.reduce_into(DT[dtype], getattr(_C.RedOp, op), got.data_ptr(), b.data_ptr(), n)
    # Half types reduce in float32 and round once, as torch does for them on CPU.
    assert torch.equal(got, expect), (got - expect).abs().max()


def test_min_max_propagate_nan(isa):
    a = torch.tensor([1.0, float("nan"), 3.0, 4.0] * 5)
    b = torch.tensor([float("nan"), 2.0, 1.0, 5.0] * 5)
    for op, ref in (("min", torch.minimum(a, b)), ("max", torch.maximum(a, b))):
        got = a.clone()
        _C.reduce_into(_C.DType.float32, getattr(_C.RedOp, op), got.data_ptr(), b.data_ptr(), a.numel())
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(got[~torch.isnan(ref)], ref[~torch.isnan(ref)])


def test_best_isa_is_picked_by_default():
    assert _C.kernel_isa() in ("generic", "avx2", "avx512")
