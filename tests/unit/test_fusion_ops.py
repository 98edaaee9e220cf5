"""dtrain.ops pack/unpack/norms against torch's cat + cast, vector_norm and clip_grad_norm_.

Casts must be bit-identical to torch's (both round to nearest even); scaled casts equal
torch's multiply-then-cast; the 2-norm, summed in double, is within 1e-6 relative of a
float64 reference (torch's own float32 norm is the looser of the two).
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from dtrain import ops
from dtrain.errors import ConfigError
from tests.multiproc.harness import REPO

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def tensors(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 3).to(dtype) for s in shapes]


SHAPE_SETS = {
    "empty-list": [],
    "tiny": [(0,), (1,), (7,)],
    "odd": [(1000,), (33, 31), (70001,), (0, 4)],
    "many": [(i % 37 + 1, i % 5 + 1) for i in range(130)],
}


@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("dst", FLOATS)
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=list(SHAPE_SETS))
@pytest.mark.parametrize("scale", [1.0, 0.25, 3.0])
def test_pack_is_cat_then_cast(src, dst, shapes, scale):
    ts = tensors(SHAPE_SETS[shapes], src)
    got = ops.pack(ts, dtype=dst, scale=scale)
    flat = torch.cat([t.float().flatten() for t in ts]) if ts else torch.zeros(0)
    want = (flat * scale).to(dst)
    assert got.dtype == dst and torch.equal(got, want)


# An fp16 flat buffer of 8 MiB or more is written with streaming stores, which need aligned
# addresses: the second tensor starts 2 bytes in, so the unaligned head, the streamed body and
# the tail all run (and, on 2 threads, pieces that start mid-buffer).
LARGE = [(1,), (4_200_001,), (7, 3)]


@pytest.mark.parametrize("isa", ["best", "avx2", "generic"])
def test_a_large_fp16_pack_is_bit_identical_on_every_instruction_set(isa):
    prog = f"""
import sys; sys.path.insert(0, {REPO!r})
import torch
from dtrain import ops
from tests.unit.test_fusion_ops import tensors, LARGE
ts = tensors(LARGE)
want = (torch.cat([t.flatten() for t in ts]) * 0.25).half()
assert want.numel() * 2 >= 8 << 20
for threads in (1, 2):
    assert torch.equal(ops.pack(ts, dtype=torch.float16, scale=0.25, threads=threads), want), threads
    out = torch.full((want.numel(),), 7.0, dtype=torch.float16)
    assert torch.equal(ops.pack(ts, dtype=torch.float16, scale=0.25, out=out, threads=threads), want), threads
"""
    env = dict(os.environ)
    env.pop("DTRAIN_ISA", None)
    if isa != "best":
        env["DTRAIN_ISA"] = isa
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("flat_dtype", FLOATS)
@pytest.mark.parametrize("dst", FLOATS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_unpack_casts_scales_and_adds(flat_dtype, dst, accumulate):
    shapes = SHAPE_SETS["odd"] + SHAPE_SETS["many"]
    outs = tensors(shapes, dst, seed=1)
    before = [t.clone() for t in outs]
    flat = (torch.randn(sum(math.prod(s) for s in shapes)) * 2).to(flat_dtype)
    ops.unpack(flat, outs, scale=0.5, accumulate=accumulate)
    off = 0
    for b, o in zip(before, outs):
        piece = flat[off:off + o.numel()].float().view(o.shape) * 0.5
        want = (b.float() + piece).to(dst) if accumulate else piece.to(dst)
        assert torch.equal(o, want)
        off += o.numel()


def test_pack_handles_mixed_dtypes_and_non_contiguous_inputs():
    a = torch.randn(6, 5).t()  # not contiguous
    b = torch.randn(9, dtype=torch.bfloat16)
    c = torch.randn(4, dtype=torch.float16)
    got = ops.pack([a, b, c], dtype=torch.float32)
    assert torch.equal(got, torch.cat([a.flatten(), b.float(), c.float()]))


def test_pack_into_a_given_buffer_and_its_checks():
    ts = tensors([(10,), (3, 3)])
    out = torch.empty(19, dtype=torch.float16)
    assert ops.pack(ts, dtype=torch.float16, out=out) is out
    with pytest.raises(ConfigError, match="19 elements"):
        ops.pack(ts, dtype=torch.float16, out=torch.empty(18, dtype=torch.float16))
    with pytest.raises(ConfigError, match="float64"):
        ops.pack([torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(ConfigError, match="contiguous"):
        ops.unpack(torch.zeros(30), [torch.zeros(6, 5).t()])
    with pytest.raises(ConfigError, match="holds|hold 9"):
        ops.unpack(torch.zeros(8), [torch.zeros(9)])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shapes", ["tiny", "odd", "many"])
def test_norms_match_a_float64_reference(dtype, shapes):
    ts = tensors(SHAPE_SETS[shapes], dtype, seed=2)
    flat64 = torch.cat([t.double().flatten() for t in ts])
    two = ops.multi_tensor_norm(ts, 2.0)
    assert math.isclose(float(two), float(flat64.norm()), rel_tol=1e-6, abs_tol=1e-30)
    inf = ops.multi_tensor_norm(ts, math.inf)
    assert float(inf) == float(flat64.abs().max())
    one = ops.multi_tensor_norm(ts, 1.0)  # other orders go through torch
    assert math.isclose(float(one), float(flat64.abs().sum()), rel_tol=1e-5)


def test_norm_reports_nan_and_does_not_depend_on_threads():
    ts = tensors([(300_000,), (5,), (200_001,)], seed=3)
    a = ops.multi_tensor_norm(ts, threads=1)
    b = ops.multi_tensor_norm(ts, threads=2)
    assert torch.equal(a, b)
    ts[2][77] = float("nan")
    assert math.isnan(float(ops.multi_tensor_norm(ts)))
    assert math.isnan(float(ops.multi_tensor_norm(ts, math.inf)))
    ts[2][77] = float("inf")
    assert float(ops.multi_tensor_norm(ts, math.inf)) == math.inf


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    def make():
        torch.manual_seed(4)
        m = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
        m(torch.randn(8, 30)).square().sum().backward()
        return m
    a, b = make(), make()
    ta = ops.clip_grad_norm_(a.parameters(), max_norm, norm_type)
    tb = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm, norm_type)
    assert math.isclose(float(ta), float(tb), rel_tol=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=0)
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        ops.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)


def test_clip_grad_norm_leaves_grads_unwritten_when_nothing_is_clipped_and_spreads_nan_as_torch():
    def grads(values):
        ps = [torch.zeros(len(v), requires_grad=True) for v in values]
        for p, v in zip(ps, values):
            p.grad = torch.tensor(v)
        return ps
    values = [[3.0, -4.0], [], [1e-3, 2.0, -0.0]]
    ps = grads(values)
    before = [p.grad._version for p in ps]
    assert math.isclose(float(ops.clip_grad_norm_(ps, 100.0)), math.sqrt(25 + 1e-6 + 4), rel_tol=1e-6)
    assert [p.grad._version for p in ps] == before  # no in-place pass over them
    assert all(torch.equal(p.grad, torch.tensor(v)) for p, v in zip(ps, values))
    ps = grads(values)
    ops.clip_grad_norm_(ps, 1.0)
    assert all(p.grad._version > b for p, b in zip(ps, before))  # scaled in C++: autograd is told
    nan_values = [[1.0, float("nan")], [2.0]]
    a, b = grads(nan_values), grads(nan_values)
    ta, tb = ops.clip_grad_norm_(a, 1e6), torch.nn.utils.clip_grad_norm_(b, 1e6)
    assert math.isnan(float(ta)) and math.isnan(float(tb))
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
        assert torch.isnan(p.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sizes", [[0], [1], [7, 0, 130], [33] * 120])
def test_clipping_scales_each_dtype_as_torchs_multiply(dtype, sizes):
    torch.manual_seed(len(sizes))
    values = [torch.randn(n).to(dtype) * 10 for n in sizes]
    a = [torch.zeros(n, dtype=dtype, requires_grad=True) for n in sizes]
    b = [torch.zeros(n, dtype=dtype, requires_grad=True) for n in sizes]
    for p, q, v in zip(a, b, values):
        p.grad, q.grad = v.clone(), v.clone()
    ta, tb = ops.clip_grad_norm_(a, 0.25), torch.nn.utils.clip_grad_norm_(b, 0.25)
    # torch returns a half-precision norm for half grads; dtrain's is float32, from double sums
    torch.testing.assert_close(ta, tb.float(), rtol=1e-5 if dtype == torch.float32 else 4e-3, atol=0)
    coef = torch.clamp(0.25 / (ta + 1e-6), max=1.0)
    for p, v in zip(a, values):  # the grads are v * coef, computed as torch computes it
        assert torch.equal(p.grad, v * coef)


def test_clipping_a_tensor_listed_twice_scales_it_twice_as_torch_does():
    g = torch.randn(1000)
    p = torch.zeros(1000, requires_grad=True)
    q = torch.zeros(1000, requires_grad=True)
    p.grad, q.grad = g.clone(), g.clone()
    view = p.grad[500:]  # and a view overlapping it
    holder = torch.zeros(500, requires_grad=True)
    holder.grad = view
    ref_holder = torch.zeros(500, requires_grad=True)
    ref_holder.grad = q.grad[500:]
    ops.clip_grad_norm_([p, p, holder], 1.0)
    torch.nn.utils.clip_grad_norm_([q, q, ref_holder], 1.0)
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_pack_into_out_and_unpack_count_as_in_place_writes_for_autograd():
    ts = [torch.randn(5), torch.randn(3, 2)]
    out = torch.empty(11, dtype=torch.float16)
    v = out._version
    ops.pack(ts, dtype=torch.float16, out=out)
    assert out._version > v
    w = torch.randn(5, requires_grad=True)
    loss = (w * w).sum()  # saves w
    with torch.no_grad():
        ops.unpack(torch.ones(5), [w], accumulate=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# The C++ reader (csrc/bindings/tensor_list.h) takes contiguous float CPU torch.Tensor and
# Parameter objects; anything else goes back to the Python checks, which copy or raise. It
# reads them through the library dtrain.ops._torch_reader compiles against this torch (the
# build of this machine's first fused call; it must succeed where dtrain itself built) or,
# before that or without it, through torch.Tensor's descriptors: every test below runs on both.
@pytest.fixture(params=["torch", "descriptors"])
def reader(request):
    from dtrain import _C
    from dtrain.ops import _torch_reader, fusion
    fusion._read([])  # binds it on first use, and starts the torch reader's build
    assert fusion._reader_bound, "the reader did not bind to this torch's Tensor type"
    assert _torch_reader.wait(600), f"the torch reader is not in use: {_torch_reader.state()}"
    k = _C.kernels
    if request.param == "torch":
        assert k.using_torch_reader()
        yield k.read_tensors
        return
    assert k.use_torch_reader(0, k.TORCH_READER_ABI) and not k.using_torch_reader()
    try:
        yield k.read_tensors
    finally:
        assert k.use_torch_reader(_torch_reader.address(), k.TORCH_READER_ABI)


def test_the_reader_reads_tensors_and_parameters_in_runs_of_one_dtype(reader):
    read = reader
    from dtrain import _C
    ts = [torch.randn(3), torch.nn.Parameter(torch.randn(2, 2)), torch.zeros(0), torch.randn(5).half(),
          torch.randn(1, dtype=torch.bfloat16), torch.randn(4, dtype=torch.bfloat16), torch.randn(7)]
    got = read(ts)
    assert (got.total, got.count) == (3 + 4 + 0 + 5 + 1 + 4 + 7, 7)
    D = _C.DType
    assert got.dtypes == [D.float32, D.float16, D.bfloat16, D.float32]
    assert read(tuple(ts)).total == got.total
    empty = read([])
    assert (empty.total, empty.count, empty.dtypes) == (0, 0, [])


class _Marked(torch.Tensor):
    pass


@pytest.mark.parametrize("odd", ["non-contiguous", "float64", "int32", "subclass", "not a tensor", "meta",
                                 "negated view", "sparse", "undefined grad"])
def test_the_reader_hands_back_what_it_cannot_read_in_place(reader, odd):
    read = reader
    make = {"non-contiguous": lambda: torch.randn(4, 3).t(), "float64": lambda: torch.randn(3, dtype=torch.float64),
            "int32": lambda: torch.arange(3, dtype=torch.int32), "subclass": lambda: torch.randn(3).as_subclass(_Marked),
            "not a tensor": lambda: [1.0, 2.0], "meta": lambda: torch.empty(3, device="meta"),
            "negated view": lambda: torch._neg_view(torch.randn(3)),
            "sparse": lambda: torch.randn(3).to_sparse(), "undefined grad": lambda: torch.randn(3).grad}[odd]
    ts = [torch.randn(5), make(), torch.randn(2)]
    assert read(ts) is None
    assert read(iter(ts)) is None  # only lists and tuples


def test_pack_unpack_and_norm_agree_on_both_paths(reader):
    """The same tensors through the C++ reader and, with one tensor made non-contiguous,
    through the Python checks: identical results."""
    shapes = [(i % 11 + 1, i % 3 + 2) for i in range(60)]
    fast = tensors(shapes, seed=5) + [torch.nn.Parameter(torch.randn(9, 4))]
    slow = [t.detach().clone() for t in fast]
    slow[-1] = slow[-1].t().contiguous().t()  # same values, transposed strides
    assert reader(fast) is not None and reader(slow) is None
    for dt in FLOATS:
        assert torch.equal(ops.pack(fast, dtype=dt, scale=0.5), ops.pack(slow, dtype=dt, scale=0.5))
    assert torch.equal(ops.multi_tensor_norm(fast), ops.multi_tensor_norm(slow))
    assert torch.equal(ops.multi_tensor_norm(fast, math.inf), ops.multi_tensor_norm(slow, math.inf))
    flat = torch.randn(sum(t.numel() for t in fast)).half()
    a = [t.detach().clone() for t in fast]
    ops.unpack(flat, a, scale=2.0, accumulate=True)
    with pytest.raises(ConfigError, match="contiguous"):  # in place: the slow path refuses a strided one
        ops.unpack(flat, slow, scale=2.0, accumulate=True)
    off = 0
    for t, before in zip(a, fast):
        want = before.detach() + flat[off:off + t.numel()].float().view(t.shape) * 2.0
        assert torch.equal(t, want)
        off += t.numel()


def test_negated_views_are_packed_as_their_values_and_never_unpacked_into(reader):
    """A negated view (torch._neg_view; a complex tensor's .conj().imag) holds the negation
    of its values in its base's memory: read through its pointer it would pack -x."""
    base = torch.randn(6)
    neg = torch._neg_view(base)
    imag = torch.randn(4, dtype=torch.complex64).conj().imag
    assert neg.is_neg() and imag.is_neg()
    ts = [torch.randn(3), neg, imag, torch.randn(2)]
    assert reader(ts) is None
    assert torch.equal(ops.pack(ts), torch.cat(ts))
    assert torch.equal(ops.pack(ts, dtype=torch.float16, scale=0.5), (torch.cat(ts) * 0.5).half())
    with pytest.raises(ConfigError, match="tensor 1 must not be a negated view.*resolve_neg"):
        ops.unpack(torch.ones(15), ts)
    assert torch.equal(ops.pack([base]), base)  # left as it was


def test_unpack_into_a_lazy_clone_writes_the_clone_not_its_source(reader):
    """A lazy clone shares its source's storage, copy-on-write: the pointer the kernels
    write through must be the clone's own (torch materialises it on a mutable access)."""
    a = torch.randn(5)
    before = a.clone()
    b = torch._lazy_clone(a)
    assert reader([b]) is not None
    ops.unpack(torch.ones(5), [b], accumulate=True)
    assert torch.equal(a, before) and torch.equal(b, before + 1)


def test_pack_takes_any_iterable_and_checks_out_on_the_fast_path():
    ts = tensors([(4,), (3, 2)], seed=6)
    assert torch.equal(ops.pack(t for t in ts), torch.cat([t.flatten() for t in ts]))
    with pytest.raises(ConfigError, match="10 elements.*float16 with 9"):
        ops.pack(ts, dtype=torch.float16, out=torch.empty(9, dtype=torch.float16))
    with pytest.raises(ConfigError, match="float32 tensor of 10 elements"):
        ops.pack(ts, dtype=torch.float32, out=torch.empty(10, dtype=torch.float16))
    with pytest.raises(ConfigError, match="contiguous"):
        ops.pack(ts, out=torch.empty(20)[::2])
    with pytest.raises(ConfigError, match="on cpu, got .* on meta"):
        ops.pack(ts, out=torch.empty(10, device="meta"))
