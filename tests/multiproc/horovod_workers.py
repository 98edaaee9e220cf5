"""Rank functions for the dtrain.horovod tests (importable, for spawn). Each asserts Horovod's
documented behaviour on its rank; a failed assertion fails the test with the rank's traceback."""

import copy
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import dtrain.horovod as hvd
from tests.reference import check, rank_input

OPS = {"sum": hvd.Sum, "avg": hvd.Average, "min": hvd.Min, "max": hvd.Max, "prod": hvd.Product}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8]
SIZES = [0, 1, 7, 1031]


def _start():
    torch.set_num_threads(1)
    hvd.init()
    return hvd.rank(), hvd.size()


def basics():
    r, n = _start()
    assert hvd.is_initialized()
    assert (hvd.local_rank(), hvd.local_size()) == (r, n)  # one host
    assert (hvd.cross_rank(), hvd.cross_size()) == (0, 1)
    assert hvd.is_homogeneous() and not hvd.mpi_enabled() and hvd.gloo_enabled() and hvd.gloo_built()
    assert hvd.nccl_built() == 0 and not hvd.rocm_built() and not hvd.ccl_built()
    assert hvd.global_process_set.size() == n and hvd.global_process_set.rank() == r
    hvd.shutdown()
    assert not hvd.is_initialized()
    try:
        hvd.init()  # Horovod's elastic re-init: refused here, saying why
        raise RuntimeError("init after shutdown must be refused in a launched job")
    except hvd.NotSupported as e:
        assert "after hvd.shutdown()" in str(e)
    return r


def allreduce_values(seed):
    """Every op x dtype x size, out of place, in place, async and async in place, against float64."""
    r, n = _start()
    for dtype in DTYPES:
        for name, op in OPS.items():
            if name == "prod" and not dtype.is_floating_point and dtype != torch.uint8:
                pass
            for k in SIZES:
                inputs = [rank_input(seed, i, dtype, k, name) for i in range(n)]
                x = inputs[r].clone()
                what = f"{dtype} {name} {k}"
                ref_op = "avg" if name == "avg" else name
                if name == "avg" and not dtype.is_floating_point:
                    got = hvd.allreduce(x, op=op)
                    want = torch.div(sum(i.long() for i in inputs), n, rounding_mode="trunc").to(dtype) \
                        if dtype != torch.uint8 else None
                    if want is not None:
                        assert torch.equal(got, want), what
                    continue
                got = hvd.allreduce(x, op=op)
                assert torch.equal(x, inputs[r]), f"{what}: allreduce must leave its input alone"
                check(got, inputs, ref_op, dtype, what=what)
                h = hvd.allreduce_async(x, op=op, name=f"a.{what}")
                check(hvd.synchronize(h), inputs, ref_op, dtype, what=what + " async")
                y = x.clone()
                assert hvd.allreduce_(y, op=op) is y
                check(y, inputs, ref_op, dtype, what=what + " in place")
                z = x.clone()
                h = hvd.allreduce_async_(z, op=op)
                assert hvd.synchronize(h) is z
                check(z, inputs, ref_op, dtype, what=what + " async in place")
                assert hvd.synchronize(h) is None  # a handle is spent once
    # int8/int16 reduce (widened on the way, wrapped back as Horovod's do)
    for dtype in (torch.int8, torch.int16):
        got = hvd.allreduce(torch.tensor([1, -2, 3], dtype=dtype) * (r + 1), op=hvd.Sum)
        assert got.dtype == dtype and got.tolist() == [n * (n + 1) // 2 * v for v in (1, -2, 3)], got
    # scale factors
    t = torch.full((5,), float(r + 1))
    got = hvd.allreduce(t, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5)
    assert torch.allclose(got, torch.full((5,), float(n * (n + 1) / 2))), got
    got = hvd.allreduce(t, op=hvd.Average, postscale_factor=3.0)
    assert torch.allclose(got, torch.full((5,), 3.0 * (n + 1) / 2)), got
    # deprecated average=
    assert torch.allclose(hvd.allreduce(t, average=False), torch.full((5,), float(n * (n + 1) / 2)))
    # non-contiguous in place
    m = torch.arange(12.0).reshape(3, 4).t()
    hvd.allreduce_(m, op=hvd.Sum)
    assert torch.equal(m, torch.arange(12.0).reshape(3, 4).t() * n)
    # poll turns true, then synchronize returns at once
    h = hvd.allreduce_async(torch.ones(1 << 16))
    while not hvd.poll(h):
        pass
    assert torch.equal(hvd.synchronize(h), torch.ones(1 << 16))
    hvd.shutdown()
    return r


def grouped(seed):
    r, n = _start()
    ts = [rank_input(seed, r, torch.float32, k, "sum") for k in (0, 1, 7, 33)] + \
         [rank_input(seed, r, torch.float64, 5, "sum"), rank_input(seed, r, torch.int64, 9, "sum")]
    every = [[rank_input(seed, i, t.dtype, t.numel(), "sum") for i in range(n)] for t in ts]
    out = hvd.grouped_allreduce(ts, op=hvd.Sum)
    for got, inputs in zip(out, every):
        check(got, inputs, "sum", inputs[0].dtype, what="grouped_allreduce")
    out = hvd.synchronize(hvd.grouped_allreduce_async(ts))
    for got, inputs in zip(out, every):
        check(got, inputs, "avg", inputs[0].dtype, what="grouped_allreduce_async") \
            if inputs[0].dtype.is_floating_point else None
    mine = [t.clone() for t in ts]
    res = hvd.grouped_allreduce_(mine, op=hvd.Max)
    for got, m, inputs in zip(res, mine, every):
        assert got is m
        check(got, inputs, "max", inputs[0].dtype, what="grouped_allreduce_")
    mine = [t.clone() for t in ts]
    res = hvd.synchronize(hvd.grouped_allreduce_async_(mine, op=hvd.Sum, name="g"))
    for got, m, inputs in zip(res, mine, every):
        assert got is m
        check(got, inputs, "sum", inputs[0].dtype, what="grouped_allreduce_async_")
    # grouped allgather and reducescatter
    parts = hvd.grouped_allgather([torch.full((r + 1, 2), float(r)), torch.tensor([r])])
    assert parts[0].shape == (n * (n + 1) // 2, 2) and parts[1].tolist() == list(range(n))
    parts = hvd.synchronize(hvd.grouped_allgather_async([torch.tensor([r, r])]))
    assert parts[0].tolist() == [i for i in range(n) for _ in range(2)]
    rs = hvd.grouped_reducescatter([torch.ones(n * 2), torch.ones(n, 3)], op=hvd.Sum)
    assert rs[0].tolist() == [float(n)] * 2 and rs[1].tolist() == [[float(n)] * 3]
    rs = hvd.synchronize(hvd.grouped_reducescatter_async([torch.ones(n * 2)], op=hvd.Sum))
    assert rs[0].tolist() == [float(n)] * 2
    hvd.shutdown()
    return r


def gather_broadcast_alltoall():
    r, n = _start()
    # allgather: first dims differ, zero rows allowed, dtypes Horovod carries (int8 and bool as bytes)
    for dtype in (torch.float32, torch.float16, torch.int64, torch.uint8, torch.int8, torch.bool):
        t = (torch.arange(r * 3).reshape(r, 3) % 2).to(dtype)
        got = hvd.allgather(t)
        want = torch.cat([(torch.arange(i * 3).reshape(i, 3) % 2).to(dtype) for i in range(n)])
        assert got.dtype == dtype and torch.equal(got, want), (dtype, got)
    got = hvd.synchronize(hvd.allgather_async(torch.tensor(float(r)), name="scalar"))
    assert got.tolist() == [float(i) for i in range(n)]
    # broadcast: every root, out of place and in place, sync and async
    for root in range(n):
        t = torch.full((3, 2), float(r))
        got = hvd.broadcast(t, root_rank=root)
        assert torch.equal(got, torch.full((3, 2), float(root))) and torch.equal(t, torch.full((3, 2), float(r)))
        u = torch.full((4,), r, dtype=torch.int16)
        assert hvd.broadcast_(u, root) is u and u.tolist() == [root] * 4
        v = torch.full((5,), float(r))
        assert torch.equal(hvd.synchronize(hvd.broadcast_async(v, root)), torch.full((5,), float(root)))
        w = torch.full((5,), float(r))
        assert hvd.synchronize(hvd.broadcast_async_(w, root, name="w")) is w and w.tolist() == [float(root)] * 5
    assert hvd.broadcast(torch.empty(0), 0).numel() == 0
    # alltoall with and without splits; 2-D rows; received splits
    t = torch.arange(n * 2 * 3).reshape(n * 2, 3) + 1000 * r
    got = hvd.alltoall(t)
    want = torch.cat([(torch.arange(n * 2 * 3).reshape(n * 2, 3) + 1000 * i)[2 * r: 2 * r + 2] for i in range(n)])
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    splits = [(r + j) % 2 + j for j in range(n)]  # rows to each rank, some 0
    t = torch.arange(sum(splits), dtype=torch.float64) + 100 * r
    out, received = hvd.alltoall(t, splits=splits)
    expect_recv = [(i + r) % 2 + r for i in range(n)]
    assert received.dtype == torch.int32 and received.tolist() == expect_recv, received
    pieces = []
    for i in range(n):
        s_i = [(i + j) % 2 + j for j in range(n)]
        start = sum(s_i[:r])
        pieces.append(torch.arange(start, start + s_i[r], dtype=torch.float64) + 100 * i)
    assert torch.equal(out, torch.cat(pieces)), (out, pieces)
    out2, rec2 = hvd.synchronize(hvd.alltoall_async(t, splits=torch.tensor(splits)))
    assert torch.equal(out2, out) and rec2.tolist() == expect_recv
    # reducescatter: even and uneven first dims (the first ranks take one row more)
    for rows in (n * 2, n * 2 + 1, 1, 0):
        t = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + r
        got = hvd.reducescatter(t, op=hvd.Sum)
        full = sum(torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + i for i in range(n))
        counts = [rows // n + (1 if i < rows % n else 0) for i in range(n)]
        start = sum(counts[:r])
        assert torch.equal(got, full[start: start + counts[r]]), (rows, got)
        avg = hvd.reducescatter(t)  # Average by default
        assert torch.allclose(avg, full[start: start + counts[r]] / n)
        got = hvd.synchronize(hvd.reducescatter_async(t, op=hvd.Max))
        assert torch.equal(got, (torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + n - 1)
                           [start: start + counts[r]])
    hvd.barrier()
    hvd.shutdown()
    return r


def autograd():
    """Gradients as Horovod defines them, checked against hand-derived values."""
    r, n = _start()
    # allreduce(Average): y = mean_i x_i on every rank; L_r = sum(w_r * y) -> dx_r = mean_i w_i
    x = torch.ones(4, requires_grad=True)
    (hvd.allreduce(x * (r + 1)) * (r + 1)).sum().backward()
    mean_w = sum(i + 1 for i in range(n)) / n
    assert torch.allclose(x.grad, torch.full((4,), mean_w * (r + 1))), x.grad
    # allgather: rows of every rank; the gradient is the average of every rank's gradient, my rows
    x = torch.full((r + 1, 2), 1.0, requires_grad=True)
    g = hvd.allgather(x)
    (g * (r + 1)).sum().backward()
    assert torch.allclose(x.grad, torch.full((r + 1, 2), mean_w)), x.grad
    # broadcast: the root gets the average of every rank's gradient, others zero
    x = torch.ones(3, requires_grad=True)
    (hvd.broadcast(x, root_rank=0) * (r + 1)).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), mean_w if r == 0 else 0.0)), x.grad
    # alltoall: the gradient comes back along the rows it travelled
    x = torch.arange(n, dtype=torch.float32, requires_grad=True)
    out = hvd.alltoall(x)  # rank r gets element r of every rank
    (out * torch.arange(n, dtype=torch.float32)).sum().backward()  # d/d(out[i]) = i: row from rank i
    assert torch.allclose(x.grad, torch.full((n,), float(r))), x.grad
    # reducescatter(Sum): my rows of the sum; every rank's x gets the gradient of the rows it fed
    x = torch.ones(n, requires_grad=True)
    (hvd.reducescatter(x, op=hvd.Sum) * (r + 1)).sum().backward()
    assert torch.allclose(x.grad, torch.arange(1, n + 1, dtype=torch.float32)), x.grad
    # grouped allreduce
    a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    ga, gb = hvd.grouped_allreduce([a, b], op=hvd.Sum)
    (ga.sum() + 2 * gb.sum()).backward()
    assert torch.allclose(a.grad, torch.full((2,), float(n))) and torch.allclose(b.grad, torch.full((3,), 2.0 * n))
    hvd.shutdown()
    return r


def sparse_and_objects():
    r, n = _start()
    s = torch.sparse_coo_tensor(torch.tensor([[r, (r + 1) % 4]]), torch.tensor([1.0, 2.0]), (4,))
    got = hvd.synchronize(hvd.sparse_allreduce_async(s, name="emb", op=hvd.Sum))
    want = torch.zeros(4)
    for i in range(n):
        want[i] += 1.0
        want[(i + 1) % 4] += 2.0
    assert got.is_sparse and torch.equal(got.to_dense(), want), got
    obj = hvd.broadcast_object({"rank": r, "list": [r] * 3}, root_rank=n - 1)
    assert obj == {"rank": n - 1, "list": [n - 1] * 3}
    assert hvd.allgather_object(("r", r)) == [("r", i) for i in range(n)]
    assert hvd.broadcast_object(None, 0) is None
    # parameters: state_dict, named_parameters generator, plain list; bool and int buffers too
    torch.manual_seed(r)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    m[1].num_batches_tracked.fill_(r)
    hvd.broadcast_parameters(m.state_dict(), root_rank=0)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    torch.manual_seed(r + 10)
    m2 = nn.Linear(2, 2)
    hvd.broadcast_parameters(m2.named_parameters(), root_rank=1)
    got = hvd.allgather(m2.weight.detach().reshape(1, 4))
    assert all(torch.equal(got[0], got[i]) for i in range(n))
    # optimizer state: Adam on rank 0 has stepped twice, others never
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (r + 1))
    if r == 0:
        for _ in range(2):
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    assert opt.param_groups[0]["lr"] == 0.01
    st = opt.state_dict()["state"]
    assert len(st) == 2 and float(st[0]["step"]) == 2.0
    sums = hvd.allgather(torch.stack([st[0]["exp_avg"].sum(), st[1]["exp_avg_sq"].sum()]).reshape(1, 2))
    assert all(torch.equal(sums[0], sums[i]) for i in range(n)), sums
    hvd.shutdown()
    return r


def process_sets():
    r, n = _start()
    evens = hvd.ProcessSet(list(range(0, n, 2)))
    hvd.add_process_set(evens)
    assert evens.included() == (r % 2 == 0) and evens.size() == len(range(0, n, 2))
    if evens.included():
        got = hvd.allreduce(torch.tensor([float(r)]), op=hvd.Sum, process_set=evens)
        assert got.item() == sum(range(0, n, 2))
        assert evens.rank() == r // 2
        assert hvd.broadcast(torch.tensor([r]), root_rank=len(evens.ranks) - 1, process_set=evens).item() == \
            evens.ranks[-1]
        assert hvd.allgather(torch.tensor([r]), process_set=evens).tolist() == evens.ranks
    else:
        assert evens.rank() is None
    hvd.barrier(process_set=evens) if evens.included() else None
    assert hvd.remove_process_set(evens) and not hvd.remove_process_set(evens)
    assert evens.included() is None
    hvd.shutdown()
    return r


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def optimizer_parity(opt_name, compression, passes, op_name, steps=6):
    """DistributedOptimizer on n ranks against one process on the concatenated batches."""
    r, n = _start()
    torch.manual_seed(0)
    model = Net()
    single = copy.deepcopy(model)
    lr = 0.05 / (n if op_name == "sum" else 1)  # summed gradients are n times larger: the same dynamics
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=0.01)}[opt_name]
    opt = hvd.DistributedOptimizer(make(model.parameters()), named_parameters=model.named_parameters(),
                                   compression={"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[compression],
                                   backward_passes_per_step=passes, op={"avg": hvd.Average, "sum": hvd.Sum}[op_name])
    assert isinstance(opt, type(make(single.parameters())))
    ref = make(single.parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    gen = torch.Generator().manual_seed(1)
    per = 3
    for _ in range(steps):
        xs = [torch.randn(passes, n, per, 8, generator=gen)]
        ys = torch.randn(passes, n, per, 4, generator=gen)
        opt.zero_grad()
        for k in range(passes):
            F.mse_loss(model(xs[0][k, r]), ys[k, r], reduction="sum").backward()
        opt.step()
        ref.zero_grad()
        scale = 1.0 / n if op_name == "avg" else 1.0
        for k in range(passes):
            (F.mse_loss(single(xs[0][k].reshape(-1, 8)), ys[k].reshape(-1, 4), reduction="sum") * scale).backward()
        ref.step()
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), single.parameters()))
    hvd.shutdown()
    return diff


def optimizer_rules():
    """Horovod's errors and the synchronize / skip_synchronize / clipping pattern."""
    r, n = _start()
    torch.manual_seed(0)
    model = Net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    x = torch.randn(4, 8) * (r + 1)
    model(x).sum().backward()
    try:
        opt.zero_grad()
        raise RuntimeError("zero_grad between backward and step must raise")
    except AssertionError as e:
        assert "zero_grad() was called after loss.backward()" in str(e)
    try:
        model(x).sum().backward()
        raise RuntimeError("a second backward before step must raise")
    except AssertionError as e:
        assert "backward_passes_per_step" in str(e)
    opt.synchronize()
    grads = [p.grad.clone() for p in model.parameters()]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    with opt.skip_synchronize():
        opt.step()
    every = hvd.allgather(torch.cat([g.reshape(-1) for g in grads]).reshape(1, -1))
    assert all(torch.equal(every[0], every[i]) for i in range(n)), "gradients must be averaged before step"
    opt.zero_grad()
    # step() after synchronize() without skip_synchronize warns (and does not reduce again)
    model(x).sum().backward()
    opt.synchronize()
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt.step()
    assert any("skip_synchronize" in str(m.message) for m in w)
    # a rank without a backward still steps with the others (its gradients count as they stand)
    opt.zero_grad()
    if r == 0:
        model(x).sum().backward()
    opt.step()
    hvd.shutdown()
    return r


def join_uneven():
    """Rank r trains 2 + r steps, then joins: everyone's steps complete, the last joiner is n-1."""
    r, n = _start()
    torch.manual_seed(0)
    model = Net()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
    for step in range(2 + r):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    last = hvd.join()
    assert last == n - 1, last
    # after join, every rank is back in step: a plain collective completes on all of them
    w = hvd.allgather(model.a.weight.detach().reshape(1, -1))
    assert w.shape[0] == n
    hvd.shutdown()
    return r, last


def sync_batch_norm():
    """SyncBatchNorm on n ranks = BatchNorm on the concatenated batch: output, gradients, stats."""
    r, n = _start()
    torch.manual_seed(0)
    x_all = torch.randn(n * 3, 4, 5, 5)
    bn = hvd.SyncBatchNorm(4)
    ref = nn.BatchNorm2d(4)
    ref.load_state_dict(bn.state_dict())
    x = x_all[r * 3:(r + 1) * 3].clone().requires_grad_()
    y = bn(x)
    w = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape) / y.numel()
    (y * w).sum().backward()
    xr = x_all.clone().requires_grad_()
    yr = ref(xr)
    wr = torch.cat([torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape) / y.numel()] * n)
    (yr * wr).sum().backward()
    assert torch.allclose(y, yr[r * 3:(r + 1) * 3], atol=1e-5), (y - yr[r * 3:(r + 1) * 3]).abs().max()
    assert torch.allclose(x.grad, xr.grad[r * 3:(r + 1) * 3], atol=1e-5)
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, ref.running_var, atol=1e-5)
    # weight gradients: the sum of every rank's equals the reference
    gw = hvd.allreduce(bn.weight.grad, op=hvd.Sum)
    assert torch.allclose(gw, ref.weight.grad, atol=1e-4), (gw, ref.weight.grad)
    bn.eval()
    assert torch.allclose(bn(x_all[:2]), ref.eval()(x_all[:2]), atol=1e-5)
    hvd.shutdown()
    return r


def timeline_file(path):
    r, n = _start()
    hvd.start_timeline(path)
    hvd.allreduce(torch.ones(10), name="first")
    hvd.synchronize(hvd.allgather_async(torch.ones(2), name="second"))
    hvd.stop_timeline()
    if r == 0:
        with open(path) as f:
            names = [e["name"] for e in json.load(f)["traceEvents"]]
        assert "allreduce first" in names and "allgather_async second" in names, names
    hvd.shutdown()
    return r


def bad_call(kind):
    """One deliberately wrong call; returns (exception type names, message) on each rank."""
    r, n = _start()
    try:
        if kind == "shape":
            hvd.allreduce(torch.ones(r + 2))
        elif kind == "same-count-shape":
            hvd.allreduce(torch.ones(2, 3) if r == 0 else torch.ones(3, 2))
        elif kind == "dtype":
            hvd.allreduce(torch.ones(4, dtype=torch.float32 if r == 0 else torch.float64))
        elif kind == "root":
            hvd.broadcast(torch.ones(3), root_rank=r)
        elif kind == "bcast-shape":
            hvd.broadcast(torch.ones(2, 3) if r == 0 else torch.ones(3, 2), root_rank=0)
        elif kind == "root-range":
            hvd.broadcast(torch.ones(3), root_rank=n)
        elif kind == "gather-shape":
            hvd.allgather(torch.ones(2, r + 1))
        elif kind == "duplicate-name":
            h = hvd.allreduce_async(torch.ones(3), name="dup")
            try:
                hvd.allreduce_async(torch.ones(3), name="dup")
            finally:
                hvd.synchronize(h)
        elif kind == "adasum":
            hvd.allreduce(torch.ones(3), op=hvd.Adasum)
        elif kind == "splits":
            hvd.alltoall(torch.ones(5), splits=[1] * (n + 1))
        return None
    except Exception as e:  # noqa: BLE001  (the test inspects the type)
        return [c.__name__ for c in type(e).__mro__], str(e)
    finally:
        if kind in ("root-range", "duplicate-name", "adasum", "splits"):
            hvd.shutdown()


def env_value(name):
    return os.environ.get(name)
