"""The real collective algorithms over the in-process loopback transport, one thread per rank."""

import math

import pytest
import torch

import dtrain
from dtrain import _C
from dtrain.comm.tensors import DTYPES as NATIVE
from tests.reference import DTYPES, OPS, check, rank_input

SIZES = [0, 1, 7, 1000003]


def run(world, op, inputs, outputs=(), counts=None, redop="sum", wire=None, root=0, ring_bytes=1 << 16,
        small_bytes=0, hosts=(), hierarchy="auto"):
    dt = NATIVE[inputs[0].dtype]
    _C.loopback_run(world, op, [t.data_ptr() for t in inputs], [t.data_ptr() for t in outputs] or [0] * world,
                    counts if counts is not None else [inputs[0].numel()] * world, dt,
                    getattr(_C.RedOp, redop), NATIVE[wire] if wire else dt, root, ring_bytes, small_bytes,
                    list(hosts), hierarchy)


def test_ring_segments_cover_every_element_once():
    for count in [0, 1, 2, 7, 1000003]:
        for n in [1, 2, 3, 4, 7]:
            segs = _C.ring_segments(count, n)
            assert sum(c for _, c in segs) == count
            assert [s for s, _ in segs] == [sum(c for _, c in segs[:i]) for i in range(n)]
            assert max(c for _, c in segs) - min(c for _, c in segs) <= 1


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("algo", ["ring", "direct"])
def test_allreduce_float32_every_op(world, n, algo):
    if algo == "direct" and n > 10_000:
        pytest.skip("the direct path is for small tensors")
    for op in OPS:
        inputs = [rank_input(n, r, torch.float32, n, op) for r in range(world)]
        got = [x.clone() for x in inputs]
        run(world, "allreduce", got, redop=op, small_bytes=0 if algo == "ring" else 1 << 30)
        for r in range(world):
            check(got[r], inputs, op, torch.float32, what=f"{algo} {op} rank {r}")
            assert torch.equal(got[r], got[0]), "ranks disagree"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world", [2, 3])
def test_allreduce_every_dtype(dtype, world):
    for op in OPS:
        if op == "avg" and not dtype.is_floating_point:
            continue
        for n in [0, 1, 7, 4099]:
            inputs = [rank_input(7, r, dtype, n, op) for r in range(world)]
            got = [x.clone() for x in inputs]
            run(world, "allreduce", got, redop=op, ring_bytes=4096)
            for r in range(world):
                check(got[r], inputs, op, dtype, what=f"{dtype} {op} n={n}")
                assert torch.equal(got[r], got[0])


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("algo", ["ring", "direct"])
def test_compressed_allreduce_within_bound_and_identical(wire, world, algo):
    n = 100003 if algo == "ring" else 999
    for op in ("sum", "avg"):
        inputs = [rank_input(3, r, torch.float32, n, op) for r in range(world)]
        got = [x.clone() for x in inputs]
        run(world, "allreduce", got, redop=op, wire=torch.float16 if wire == "fp16" else torch.bfloat16,
            small_bytes=0 if algo == "ring" else 1 << 30)
        for r in range(world):
            check(got[r], inputs, op, torch.float32, compression=wire, what=f"{wire} {op}")
            assert torch.equal(got[r], got[0]), "compressed results must be bitwise identical on every rank"
        # Compression really happened: the result is not the exact float32 sum.
        exact32 = [x.clone() for x in inputs]
        run(world, "allreduce", exact32, redop=op, small_bytes=0 if algo == "ring" else 1 << 30)
        assert not torch.equal(got[0], exact32[0])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", SIZES)
def test_broadcast(world, n):
    for root in range(world):
        data = [rank_input(root, r, torch.float64, n, "sum") for r in range(world)]
        want = data[root].clone()
        run(world, "broadcast", data, root=root, ring_bytes=4096)
        for t in data:
            assert torch.equal(t, want)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_allgather_sizes_differ_per_rank(world):
    for sizes in ([0] * world, [1] * world, [r * 3 + (r % 2) for r in range(world)], [1000003] + [5] * (world - 1)):
        ins = [torch.randint(0, 255, (sizes[r],), dtype=torch.uint8) for r in range(world)]
        outs = [torch.empty(sum(sizes), dtype=torch.uint8) for _ in range(world)]
        run(world, "allgather", ins, outs, counts=sizes, ring_bytes=4096)
        want = torch.cat(ins)
        for o in outs:
            assert torch.equal(o, want)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("block", [0, 1, 7, 250001])
@pytest.mark.parametrize("op", ["sum", "avg", "max"])
def test_reduce_scatter(world, block, op):
    ins = [rank_input(block, r, torch.float32, block * world, op) for r in range(world)]
    outs = [torch.empty(block) for _ in range(world)]
    keep = [x.clone() for x in ins]
    run(world, "reduce_scatter", ins, outs, counts=[block] * world, redop=op, ring_bytes=4096)
    for r in range(world):
        check(outs[r], [x[r * block:(r + 1) * block] for x in keep], op, torch.float32, what=f"rs rank {r}")
        assert torch.equal(ins[r], keep[r]), "reduce_scatter must not modify its input"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("block", [0, 1, 7, 100003])
def test_alltoall(world, block):
    ins = [torch.arange(world * block, dtype=torch.int64) + 10_000_000 * r for r in range(world)]
    outs = [torch.empty(world * block, dtype=torch.int64) for _ in range(world)]
    run(world, "alltoall", ins, outs, counts=[block] * world, ring_bytes=4096)
    for r in range(world):
        want = torch.cat([ins[j][r * block:(r + 1) * block] for j in range(world)])
        assert torch.equal(outs[r], want)


@pytest.mark.parametrize("world", [1, 2, 5])
def test_barrier(world):
    run(world, "barrier", [torch.empty(0)] * world)


def test_tiny_ring_buffer_still_correct():
    # A 4 KiB ring forces thousands of wrap-arounds and partial writes for one call.
    world, n = 3, 1000003
    inputs = [rank_input(9, r, torch.float64, n, "sum") for r in range(world)]
    got = [x.clone() for x in inputs]
    run(world, "allreduce", got, ring_bytes=4096)
    for g in got:
        check(g, inputs, "sum", torch.float64)
    assert math.isfinite(got[0].sum().item())


# ---- hierarchical allreduce: hosts[r] is rank r's host (the lowest rank on it) ----

LAYOUTS = {"2x2": [0, 0, 2, 2], "3x2": [0, 0, 2, 2, 4, 4], "2x3": [0, 0, 0, 3, 3, 3],
           "2x2 interleaved": [0, 1, 0, 1]}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [0, 1, 7, 100003])
def test_hierarchical_allreduce_every_op(layout, n):
    hosts = LAYOUTS[layout]
    world = len(hosts)
    for op in OPS:
        inputs = [rank_input(n, r, torch.float32, n, op) for r in range(world)]
        got = [x.clone() for x in inputs]
        run(world, "allreduce", got, redop=op, hosts=hosts, hierarchy="hierarchical")
        for r in range(world):
            check(got[r], inputs, op, torch.float32, what=f"{layout} {op} rank {r}")
            assert torch.equal(got[r], got[0]), "ranks disagree"


@pytest.mark.parametrize("dtype", DTYPES)
def test_hierarchical_allreduce_every_dtype(dtype):
    for op in OPS:
        if op == "avg" and not dtype.is_floating_point:
            continue
        inputs = [rank_input(5, r, dtype, 4099, op) for r in range(4)]
        got = [x.clone() for x in inputs]
        run(4, "allreduce", got, redop=op, hosts=LAYOUTS["2x2"], hierarchy="hierarchical", ring_bytes=4096)
        for r in range(4):
            check(got[r], inputs, op, dtype, what=f"{dtype} {op}")
            assert torch.equal(got[r], got[0])


def test_hierarchical_allreduce_in_many_chunks(monkeypatch):
    """Past DTRAIN_HIERARCHY_CHUNK_BYTES (2 MiB) the chunks pipeline over two threads per rank."""
    n = (5 << 20) // 4 + 13  # 5 MiB and an odd tail: two chunks of unequal length
    for op in ("sum", "avg", "max"):
        inputs = [rank_input(11, r, torch.float32, n, op) for r in range(6)]
        got = [x.clone() for x in inputs]
        run(6, "allreduce", got, redop=op, hosts=LAYOUTS["3x2"], hierarchy="hierarchical", ring_bytes=1 << 20)
        for r in range(6):
            check(got[r], inputs, op, torch.float32, what=f"chunked {op} rank {r}")
            assert torch.equal(got[r], got[0])


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16])
def test_hierarchical_compressed_allreduce_within_bound_and_identical(wire):
    name = "fp16" if wire == torch.float16 else "bf16"
    for op in ("sum", "avg"):
        inputs = [rank_input(3, r, torch.float32, 100003, op) for r in range(4)]
        got = [x.clone() for x in inputs]
        run(4, "allreduce", got, redop=op, wire=wire, hosts=LAYOUTS["2x2"], hierarchy="hierarchical")
        for r in range(4):
            check(got[r], inputs, op, torch.float32, compression=name, what=f"{name} {op}")
            assert torch.equal(got[r], got[0]), "compressed results must be bitwise identical on every rank"
        exact = [x.clone() for x in inputs]
        run(4, "allreduce", exact, redop=op, hosts=LAYOUTS["2x2"], hierarchy="hierarchical")
        assert not torch.equal(got[0], exact[0]), "the across-host step must compress"


@pytest.mark.parametrize("layout", [[0, 0, 2], [0, 1, 2, 3], [0, 0, 0, 0]])
def test_layouts_without_equal_hosts_fall_back_to_the_flat_ring(layout):
    """Uneven hosts, one rank per host, or one host: the flat ring, still correct."""
    world = len(layout)
    inputs = [rank_input(2, r, torch.float32, 1001, "sum") for r in range(world)]
    for hierarchy in ("hierarchical", "flat"):
        got = [x.clone() for x in inputs]
        run(world, "allreduce", got, hosts=layout, hierarchy=hierarchy)
        for r in range(world):
            check(got[r], inputs, "sum", torch.float32, what=f"{layout} {hierarchy}")


def test_hierarchy_sums_in_another_order_than_the_flat_ring():
    """The two paths really differ (so the tests above exercise the hierarchical one): float32
    sums of values of mixed magnitude round differently."""
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(4099, generator=g) * 10.0 ** torch.randint(-6, 6, (4099,), generator=g))
              for _ in range(4)]
    flat = [x.clone() for x in inputs]
    hier = [x.clone() for x in inputs]
    run(4, "allreduce", flat, hosts=LAYOUTS["2x2 interleaved"], hierarchy="flat")
    run(4, "allreduce", hier, hosts=LAYOUTS["2x2 interleaved"], hierarchy="hierarchical")
    assert not torch.equal(flat[0], hier[0])
    torch.testing.assert_close(flat[0], hier[0], rtol=1e-5, atol=1e-5)


def test_unknown_hierarchy_is_refused():
    x = [torch.ones(4) for _ in range(2)]
    with pytest.raises(dtrain.ConfigError, match="hierarchy='ring' is not one of"):
        run(2, "allreduce", x, hierarchy="ring")
