"""fused_bias_gelu, fused_layer_norm and FusedLayerNorm against torch's F.gelu(x + b),
F.layer_norm and nn.LayerNorm, forward and backward.

Bounds: gradcheck in float64 (the kernels' double versions, so the backward formulas
themselves are checked); float32 against torch within 2e-6 absolute for GELU (torch's own
erf is an approximation with 1.5e-7 error, which ours shares) and within 1e-5 of max(largest value, 1) for LayerNorm and all gradients (sums over 1,000+ rows differ in order).
"""

import ast
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dtrain import _C, ops
from dtrain.errors import ConfigError
from dtrain.nn import FusedLayerNorm
from dtrain.ops import nn as nn_ops
from tests.multiproc.harness import REPO

SHAPES = [(1, 1), (3, 7), (257, 33), (2, 5, 64), (1031, 1024), (0, 16)]


@pytest.fixture(autouse=True)
def _fused_at_every_size(monkeypatch):
    """fused_layer_norm leaves small CPU inputs to torch; these tests check its kernels on them."""
    monkeypatch.setattr(nn_ops, "TORCH_BELOW", 0)


def close(a, b, rel=1e-5):
    """|a - b| <= rel * max(|b|, 1): relative to the largest value, absolute below 1 (a
    one-element row normalises to exactly 0 here, to 3e-6 in torch)."""
    if a.numel() == 0:
        return
    scale = max(float(b.detach().abs().max()), 1.0)
    assert float((a - b).detach().abs().max()) <= rel * scale


@pytest.mark.parametrize("shape", SHAPES)
def test_bias_gelu_matches_torch(shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).requires_grad_()
    b = torch.randn(shape[-1], generator=g).requires_grad_()
    y = ops.fused_bias_gelu(x, b)
    ref = F.gelu(x + b)
    assert y.shape == ref.shape
    if y.numel():
        assert float((y - ref).detach().abs().max()) <= 2e-6
    dy = torch.randn(shape, generator=g)
    gx, gb = torch.autograd.grad(y, (x, b), dy)
    rx, rb = torch.autograd.grad(ref, (x, b), dy)
    close(gx, rx)
    close(gb, rb)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_matches_torch(shape, affine):
    g = torch.Generator().manual_seed(1)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 1).requires_grad_()
    w = torch.randn(n, generator=g).requires_grad_() if affine != "none" else None
    b = torch.randn(n, generator=g).requires_grad_() if affine == "both" else None
    y = ops.fused_layer_norm(x, w, b, 1e-5)
    ref = F.layer_norm(x, (n,), w, b, 1e-5)
    close(y, ref)
    dy = torch.randn(shape, generator=g)
    inputs = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, inputs, dy)
    if n == 1:  # a row of one normalises to exactly 0: y = bias, and no gradient reaches x or w
        assert not got[0].any() and (w is None or not got[1].any())
        return  # (torch leaves its rounding residue times rstd = 316 in dw: 1.6e-5 here)
    for mine, want in zip(got, torch.autograd.grad(ref, inputs, dy)):
        close(mine, want)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(ops.fused_bias_gelu, (x, b))
    assert torch.autograd.gradcheck(lambda x, w, b: ops.fused_layer_norm(x, w, b, 1e-5), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: ops.fused_layer_norm(x, None, None, 1e-5), (x,))


def test_fused_layer_norm_module_is_a_drop_in():
    torch.manual_seed(3)
    ref = torch.nn.LayerNorm((4, 6), eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mine = FusedLayerNorm((4, 6), eps=1e-6)
    mine.load_state_dict(ref.state_dict())
    assert set(mine.state_dict()) == set(ref.state_dict())
    x = torch.randn(3, 5, 4, 6, requires_grad=True)
    y, r = mine(x), ref(x)
    close(y, r)
    dy = torch.randn_like(y)
    for a, c in zip(torch.autograd.grad(y, [x, mine.weight, mine.bias], dy),
                    torch.autograd.grad(r, [x, ref.weight, ref.bias], dy)):
        close(a, c)
    plain = FusedLayerNorm(8, elementwise_affine=False)
    z = torch.randn(4, 8)
    close(plain(z), F.layer_norm(z, (8,)))


def test_other_dtypes_fall_back_to_torch_and_shapes_are_checked():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    b = torch.randn(8, dtype=torch.bfloat16)
    assert torch.equal(ops.fused_bias_gelu(x, b), F.gelu(x + b))
    with pytest.raises(ConfigError, match="last dimension"):
        ops.fused_bias_gelu(torch.randn(4, 8), torch.randn(7))
    with pytest.raises(ConfigError, match="weight has shape"):
        ops.fused_layer_norm(torch.randn(4, 8), torch.randn(4), None)


def test_thread_count_only_reorders_the_column_sums():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3000, 96, generator=g, requires_grad=True)
    b = torch.randn(96, generator=g, requires_grad=True)
    dy = torch.randn(3000, 96, generator=g)
    grads = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        grads.append(torch.autograd.grad(ops.fused_bias_gelu(x, b), (x, b), dy))
    torch.set_num_threads(1)
    assert torch.equal(grads[0][0], grads[1][0])  # elementwise: identical
    close(grads[0][1], grads[1][1], rel=1e-6)


@pytest.mark.parametrize("shape", [(3, 7), (129, 2053), (64, 4096), (0, 5)])  # odd widths: unaligned rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_stores_give_the_same_bits(monkeypatch, shape, dtype):
    """Large outputs are written with non-temporal stores (DTRAIN_NN_STREAM forces either
    way): the values must not depend on how they were stored."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(shape[-1], generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(shape[-1], generator=g, dtype=dtype).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=dtype)
    outs = []
    for mode in ("0", "1"):
        monkeypatch.setenv("DTRAIN_NN_STREAM", mode)
        y1 = ops.fused_layer_norm(x, w, b)
        y2 = ops.fused_bias_gelu(x, b)
        outs.append([y1, y2, *torch.autograd.grad((y1 * dy).sum() + (y2 * dy).sum(), (x, w, b))])
    for a, c in zip(*outs):
        assert torch.equal(a, c)
    # and they are right: against torch
    close(outs[1][0], F.layer_norm(x, (shape[-1],), w, b))


def test_kernels_share_torchs_openmp_runtime():
    """Multi-threaded kernels run on the OpenMP team torch uses (kernels/cpu/threads.h): _C
    asks for libgomp.so.1 by name and gets the copy torch loaded, so a process that imports
    only torch and dtrain maps one. (A fresh process: scikit-learn, which other tests import,
    brings a libgomp of its own under another name.)"""
    with open(_C.__file__, "rb") as f:
        binary = f.read()
    assert b"libgomp.so.1\0" in binary and b"GOMP_parallel" in binary  # linked against OpenMP, and uses it
    prog = """
import torch
from dtrain import ops
torch.set_num_threads(2)
x = torch.randn(512, 512)
torch.mm(x, x)                            # torch's pool
ops.fused_bias_gelu(x, torch.zeros(512))  # ours, on 2 threads (256K elements)
with open("/proc/self/maps") as f:
    print(sorted({line.split()[-1] for line in f if "libgomp" in line}))
"""
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert p.returncode == 0, p.stderr[-2000:]
    gomp = ast.literal_eval(p.stdout.strip().splitlines()[-1])
    assert len(gomp) == 1, f"two OpenMP runtimes in one process: {gomp}"


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_the_other_instruction_sets_agree_with_torch_and_stream_the_same_bits(isa):
    """The kernels for the instruction sets this machine does not pick (DTRAIN_ISA pins one):
    LayerNorm's rows are written through vector stores on AVX-512 and AVX2 and plain loops
    elsewhere, and every way must match torch and give the same bits streamed or not."""
    tests = ["test_layer_norm_matches_torch", "test_streaming_stores_give_the_same_bits", "test_bias_gelu_matches_torch"]
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        " or ".join(tests)], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env=dict(os.environ, DTRAIN_ISA=isa, PYTHONPATH=REPO))
    assert p.returncode == 0 and " passed" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]


def test_small_cpu_inputs_run_torchs_layer_norm_and_large_ones_the_fused_kernel(monkeypatch):
    """Under TORCH_BELOW elements torch's kernel is the faster one: its result, bit for bit,
    and its backward node; at or above it, dtrain's Function."""
    monkeypatch.setattr(nn_ops, "TORCH_BELOW", 64)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    small = torch.randn(3, 16, requires_grad=True)
    y = ops.fused_layer_norm(small, w, b)
    assert torch.equal(y, F.layer_norm(small, (16,), w, b))
    assert "NativeLayerNorm" in type(y.grad_fn).__name__
    large = torch.randn(4, 16, requires_grad=True)
    y = ops.fused_layer_norm(large, w, b)
    assert type(y.grad_fn).__name__ == "_LayerNormBackward"
    close(y, F.layer_norm(large, (16,), w, b))
    assert "NativeLayerNorm" in type(FusedLayerNorm(16)(small).grad_fn).__name__  # the module too
