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
