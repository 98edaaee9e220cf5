"""Functions that run on every rank of a multi-process test (importable, for spawn)."""

import hashlib
import os

import torch

import dtrain
from tests.reference import DTYPES, OPS, check, rank_input

SIZES = [0, 1, 7, 1000003]


def digest(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def all_collectives(seed):
    """Every collective, dtype and size against a float64 reference built from every rank's seeded input.

    Returns digests of the results so the test can check that all ranks agree bit for bit.
    """
    torch.set_num_threads(1)
    dtrain.init(timeout=60)
    r, n = dtrain.rank(), dtrain.world_size()
    digests = []
    for dtype in DTYPES:
        for op in OPS:
            if op == "avg" and not dtype.is_floating_point:
                continue
            sizes = SIZES if dtype in (torch.float32, torch.int64) else [0, 1, 7, 4099]
            for size in sizes:
                inputs = [rank_input(seed + size, j, dtype, size, op) for j in range(n)]
                got = dtrain.allreduce(inputs[r].clone(), op=op)
                check(got, inputs, op, dtype, what=f"allreduce {dtype} {op} n={size}")
                digests.append(digest(got))
    for size in SIZES:
        for compression in ("fp16", "bf16"):
            inputs = [rank_input(seed + 1, j, torch.float32, size, "sum") for j in range(n)]
            got = dtrain.allreduce(inputs[r].clone(), compression=compression)
            check(got, inputs, "sum", torch.float32, compression=compression, what=f"{compression} n={size}")
            digests.append(digest(got))
        for root in range(n):
            t = rank_input(seed + root, r, torch.float64, size, "sum")
            dtrain.broadcast(t, root=root)
            assert torch.equal(t, rank_input(seed + root, root, torch.float64, size, "sum"))
        # allgather with a different row count on every rank, 2-D rows
        rows = [(size + j) % 5 + j for j in range(n)]
        mine = torch.full((rows[r], 3), r, dtype=torch.int32)
        out = dtrain.allgather(mine)
        assert torch.equal(out, torch.cat([torch.full((rows[j], 3), j, dtype=torch.int32) for j in range(n)]))
        rs_in = [rank_input(seed, j, torch.float32, size * n, "sum").reshape(n, size) for j in range(n)]
        got = dtrain.reduce_scatter(rs_in[r].clone())
        assert got.shape == (1, size)
        check(got[0], [x[r] for x in rs_in], "sum", torch.float32, what=f"reduce_scatter n={size}")
        splits = [(size + r + j) % 4 for j in range(n)]
        src = torch.arange(sum(splits), dtype=torch.int64) + 1000 * r
        got = dtrain.alltoall(src, splits=splits)
        expect = []
        for j in range(n):
            their = [(size + j + k) % 4 for k in range(n)]
            start = sum(their[:r])
            expect.append(torch.arange(sum(their), dtype=torch.int64)[start:start + their[r]] + 1000 * j)
        assert torch.equal(got, torch.cat(expect))
    # point to point around the ring, odd size
    nxt, prv = (r + 1) % n, (r - 1) % n
    if r % 2 == 0:
        dtrain.send(torch.full((7,), float(r)), nxt)
        got = dtrain.recv(torch.empty(7), prv)
    else:
        got = dtrain.recv(torch.empty(7), prv)
        dtrain.send(torch.full((7,), float(r)), nxt)
    assert torch.equal(got, torch.full((7,), float(prv)))
    dtrain.barrier()
    transports = sorted({dtrain.comm.group.current().world.transport_to(j) for j in range(n) if j != r})
    dtrain.shutdown()
    return digests, transports


def layouts_and_async():
    """Non-contiguous tensors, async ops in flight together, and sub-groups."""
    dtrain.init(timeout=60)
    r, n = dtrain.rank(), dtrain.world_size()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * (r + 1)
    view = base.t()  # not contiguous
    assert not view.is_contiguous()
    dtrain.allreduce(view)
    total = sum(j + 1 for j in range(n))
    assert torch.equal(base, torch.arange(24, dtype=torch.float32).reshape(4, 6) * total)
    works = [dtrain.allreduce(torch.full((1000 + k,), float(k + r)), async_op=True) for k in range(5)]
    for k, w in enumerate(works):
        out = w.wait(timeout=30)
        assert torch.equal(out, torch.full((1000 + k,), float(k * n + sum(range(n)))))
        assert w.is_completed()
    evens = dtrain.new_group([j for j in range(n) if j % 2 == 0])
    odds = dtrain.new_group([j for j in range(n) if j % 2 == 1])
    mine = evens if r % 2 == 0 else odds
    t = dtrain.allreduce(torch.tensor([float(r)]), group=mine)
    assert t.item() == sum(j for j in mine.ranks), (t, mine)
    other = odds if r % 2 == 0 else evens
    if other.size > 0 and r not in other.ranks:
        try:
            dtrain.allreduce(torch.ones(1), group=other)
            raise AssertionError("a non-member call must raise")
        except dtrain.ConfigError as e:
            assert "not in it" in str(e)
    b = torch.full((3,), float(r))
    dtrain.broadcast(b, root=mine.size - 1, group=mine)
    assert torch.equal(b, torch.full((3,), float(mine.ranks[-1])))
    dtrain.shutdown()
    return r


def bad_inputs():
    """Typed errors that say what to do; none of them may break the job."""
    dtrain.init(timeout=30)
    caught = []
    for call in (lambda: dtrain.allreduce(torch.ones(3, dtype=torch.complex64)),
                 lambda: dtrain.allreduce(torch.ones(3, dtype=torch.bool)),
                 lambda: dtrain.allreduce(torch.ones(3), op="median"),
                 lambda: dtrain.allreduce(torch.ones(3, dtype=torch.int32), op="avg"),
                 lambda: dtrain.allreduce(torch.ones(3, dtype=torch.int32), compression="fp16"),
                 lambda: dtrain.allreduce(torch.ones(3), compression="int4"),
                 lambda: dtrain.allreduce(torch.ones(3, device="meta")),
                 lambda: dtrain.allreduce([1.0, 2.0]),
                 lambda: dtrain.broadcast(torch.ones(3), root=99),
                 lambda: dtrain.reduce_scatter(torch.ones(3)),
                 lambda: dtrain.alltoall(torch.ones(3), splits=[1, 1, 1, 1, 1])):
        try:
            call()
            caught.append(None)
        except dtrain.ConfigError as e:
            caught.append(str(e))
    ok = dtrain.allreduce(torch.ones(2))  # the job goes on
    assert torch.equal(ok, torch.full((2,), float(dtrain.world_size())))
    dtrain.shutdown()
    return caught


def env_flag(name):
    return os.environ.get(name)


def hierarchical(per_host, seed):
    """Ranks on hosts of `per_host` (host ids faked, so hosts talk TCP over loopback): the flat
    ring and the hierarchical allreduce, each against the float64 reference.

    Returns (layout flag, transports, digests per hierarchy) so the test can check that every
    rank holds the same bits.
    """
    torch.set_num_threads(1)
    os.environ["DTRAIN_HOST_ID"] = f"fakehost{int(os.environ['DTRAIN_RANK']) // per_host}"
    dtrain.init(timeout=60)
    r, n = dtrain.rank(), dtrain.world_size()
    world = dtrain.comm.group.current()
    native = world.default._native
    digests = {}
    for hierarchy in ("flat", "hierarchical"):
        native.hierarchy = hierarchy
        out = digests[hierarchy] = []
        for dtype in (torch.float32, torch.float64, torch.int64, torch.float16):
            for op in OPS:
                if op == "avg" and not dtype.is_floating_point:
                    continue
                for size in (0, 1, 7, 100003) if dtype != torch.float32 else (0, 1, 7, 100003, (9 << 20) // 4 + 5):
                    inputs = [rank_input(seed + size, j, dtype, size, op) for j in range(n)]
                    got = dtrain.allreduce(inputs[r].clone(), op=op)
                    check(got, inputs, op, dtype, what=f"{hierarchy} allreduce {dtype} {op} n={size}")
                    out.append(digest(got))
        for compression in ("fp16", "bf16"):
            inputs = [rank_input(seed + 1, j, torch.float32, 300007, "sum") for j in range(n)]
            got = dtrain.allreduce(inputs[r].clone(), compression=compression)
            check(got, inputs, "sum", torch.float32, compression=compression, what=f"{hierarchy} {compression}")
            out.append(digest(got))
    transports = {j: world.world.transport_to(j) for j in range(n) if j != r}
    layout = native.hierarchical_layout
    dtrain.shutdown()
    return layout, transports, digests


def sendrecv_ring():
    """Every rank sends to the next and receives from the previous at once, with tensors far
    larger than a transport's buffer (send() then recv() would leave every rank waiting on its
    send), in every dtype and at sizes 0, 1, odd; then one-sided legs and the argument checks."""
    dtrain.init()
    r, n = dtrain.rank(), dtrain.world_size()
    nxt, prv = (r + 1) % n, (r - 1) % n
    for dtype in DTYPES:
        for size in SIZES + [3 << 20]:
            mine = (torch.arange(size) % 97 + 1000 * r).to(dtype)
            got = torch.full((size,), -1).to(dtype)
            assert dtrain.sendrecv(mine, nxt, got, prv) is got
            assert torch.equal(got, (torch.arange(size) % 97 + 1000 * prv).to(dtype)), (dtype, size)
    # one-sided: ranks trade along a line, the ends use one leg only; sizes differ per direction
    down = torch.full((5,), float(r))
    up = torch.empty(3) if r > 0 else None
    back = torch.empty(5) if r < n - 1 else None
    dtrain.sendrecv(torch.full((3,), float(r)) if r < n - 1 else None, nxt if r < n - 1 else None,
                    up, prv if r > 0 else None)
    dtrain.sendrecv(down if r > 0 else None, prv if r > 0 else None, back, nxt if r < n - 1 else None)
    if r > 0:
        assert up.tolist() == [float(prv)] * 3
    if r < n - 1:
        assert back.tolist() == [float(nxt)] * 5
    dtrain.sendrecv(None, None, None, None)  # nothing to do is fine
    errors = []
    for call in (lambda: dtrain.sendrecv(torch.zeros(1), r, torch.zeros(1), prv),
                 lambda: dtrain.sendrecv(torch.zeros(1), None, None, None),
                 lambda: dtrain.sendrecv(torch.zeros(1), nxt, torch.zeros(1, dtype=torch.int64), prv)):
        try:
            call()
            errors.append(None)
        except dtrain.ConfigError as e:
            errors.append(str(e))
    dtrain.barrier()
    dtrain.shutdown()
    return errors


def last_bytes_then_exit():
    """Rank 0 broadcasts, returns and exits while rank 1 is stopped (SIGSTOP) in the same
    broadcast; rank 1 resumes with the bytes in its ring and a dead peer. Returns rank 1's
    tensor (rank 0: None)."""
    import signal
    import subprocess
    import time
    dtrain.init()
    pid = dtrain.allgather(torch.tensor([os.getpid()]))
    t = torch.arange(4.0) if dtrain.rank() == 0 else torch.zeros(4)
    if dtrain.rank() == 1:
        dtrain.broadcast(t, root=0)  # waits, mostly asleep between polls, for rank 0
        return t.tolist()
    time.sleep(0.3)  # rank 1 is in its broadcast by now
    os.kill(int(pid[1]), signal.SIGSTOP)
    dtrain.broadcast(t, root=0)  # 16 bytes: written into rank 1's ring, done without waiting for it
    # Rank 1 goes on only once this process is gone.
    subprocess.Popen(["sh", "-c", f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 0.05; done; "
                      f"sleep 0.1; kill -CONT {int(pid[1])}"], start_new_session=True)
    return None
