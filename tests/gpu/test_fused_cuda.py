"""The CUDA kernels against torch on the GPU: the same bounds as the CPU tests
(tests/unit/test_fused_optim.py, test_fusion_ops.py). Skip without a GPU; fail instead
with DTRAIN_TEST_GPU=1."""

import pytest
import torch

from tests.gpu.test_cuda_tensors import require_gpu
from tests.unit.test_fused_optim import CONFIGS, IDS, SHAPES, ulps


def run_cuda(opt_cls, kwargs, shapes, steps, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype).cuda().requires_grad_() for s in shapes]
    opt = opt_cls(params, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype).cuda()
        opt.step()
    return [p.detach().cpu() for p in params]


def test_cuda_kernels_were_built():
    require_gpu()
    from dtrain import _C
    assert _C.kernels.cuda_built, "this build has no CUDA kernels: was nvcc missing at build time?"


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("shapes", ["tiny", "odd", "many"])
def test_cuda_optimizers_match_torch(cfg, shapes):
    require_gpu()
    fused, ref, kw = cfg
    for steps, bound in ((1, 4), (20, 32)):
        mine = run_cuda(fused, kw, SHAPES[shapes], steps, 9)
        theirs = run_cuda(ref, kw, SHAPES[shapes], steps, 9)
        assert max(ulps(a, b) for a, b in zip(mine, theirs)) <= bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_pack_unpack_match_torch(dtype):
    require_gpu()
    from dtrain import ops
    ts = [torch.randn(s, device="cuda") for s in [(0,), (1,), (7,), (1000,), (70001,), (33, 31)]]
    flat = ops.pack(ts, dtype=dtype, scale=0.5)
    torch.testing.assert_close(flat, (torch.cat([t.flatten() for t in ts]) * 0.5).to(dtype), rtol=0, atol=0)
    outs = [torch.zeros_like(t) for t in ts]
    ops.unpack(flat, outs, scale=2.0, accumulate=True)
    off = 0
    for o in outs:
        want = flat[off:off + o.numel()].float().view(o.shape) * 2.0
        torch.testing.assert_close(o, want, rtol=0, atol=0)
        off += o.numel()


@pytest.fixture(params=["builtin", "nvrtc"])
def kernels(request, monkeypatch):
    """Runs a test on the nvcc-built kernels and again on the NVRTC-compiled ones."""
    require_gpu()
    if request.param == "nvrtc":
        from dtrain.ops import _nvrtc
        if not _nvrtc.available():
            pytest.skip("the run-time (NVRTC) kernels need CuPy: pip install cupy-cuda12x")
    else:
        from dtrain import _C
        if not _C.kernels.cuda_built:
            pytest.skip("this build has no nvcc-built CUDA kernels")
    monkeypatch.setenv("DTRAIN_CUDA_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=IDS[:4])
def test_cuda_optimizers_both_paths(kernels, cfg):
    fused, ref, kw = cfg
    mine = run_cuda(fused, kw, SHAPES["many"], 5, 4)
    theirs = run_cuda(ref, kw, SHAPES["many"], 5, 4)
    assert max(ulps(a, b) for a, b in zip(mine, theirs)) <= 16


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_cuda_norm_matches_torch(kernels, norm_type):
    from dtrain import ops
    g = torch.Generator().manual_seed(3)
    shapes = [(0,), (1,), (7,), (70001,), (300, 301)] + [(i % 13 + 1, 5) for i in range(110)]
    ts = [torch.randn(s, generator=g).cuda() for s in shapes]
    got = ops.multi_tensor_norm(ts, norm_type)
    assert got.is_cuda  # left on the device, as torch's clip_grad_norm_ leaves it
    want = torch.linalg.vector_norm(torch.cat([t.flatten().double() for t in ts]), norm_type).float()
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=2e-6, atol=0)
    ts[3][5] = float("nan")
    assert torch.isnan(ops.multi_tensor_norm(ts, norm_type)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (257, 1024), (64, 4097)])
def test_cuda_bias_gelu_matches_torch(kernels, dtype, tol, shape):
    from dtrain import ops
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g).to(dtype).cuda().requires_grad_()
    b = torch.randn(shape[-1], generator=g).to(dtype).cuda().requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype).cuda()
    y = ops.fused_bias_gelu(x, b)
    dx, db = torch.autograd.grad(y, (x, b), dy)
    xr, br = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    yr = torch.nn.functional.gelu(xr + br)
    dxr, dbr = torch.autograd.grad(yr, (xr, br), dy.double())
    scale = max(1.0, shape[0] ** 0.5)  # db sums rows: its rounding grows with their count
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), dxr, rtol=tol, atol=tol)
    torch.testing.assert_close(db.double(), dbr, rtol=tol * scale, atol=tol * scale)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (300, 1024), (17, 4099)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_cuda_layer_norm_matches_torch(kernels, dtype, tol, shape, affine):
    from dtrain import ops
    g = torch.Generator().manual_seed(6)
    n = shape[-1]
    x = torch.randn(shape, generator=g).to(dtype).cuda().requires_grad_()
    w = torch.randn(n, generator=g).to(dtype).cuda().requires_grad_() if affine != "none" else None
    b = torch.randn(n, generator=g).to(dtype).cuda().requires_grad_() if affine == "both" else None
    dy = torch.randn(shape, generator=g).to(dtype).cuda()
    inputs = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(ops.fused_layer_norm(x, w, b, 1e-5), inputs, dy)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    rw = ref_in[1] if w is not None else None
    rb = ref_in[2] if b is not None else None
    want = torch.autograd.grad(torch.nn.functional.layer_norm(ref_in[0], (n,), rw, rb, 1e-5), ref_in, dy.double())
    scale = max(1.0, shape[0] ** 0.5)
    for i, (a, e) in enumerate(zip(got, want)):
        t = tol * (scale if i else 4)  # dx: a difference of sums over the row; dw/db: sums over rows
        torch.testing.assert_close(a.double(), e, rtol=t, atol=t)
