"""Run by test_torch_backend under dtrain-run: every collective through backend="torch" (gloo)
against the float64 reference."""

import torch

import dtrain
from tests.reference import OPS, check, rank_input

torch.set_num_threads(1)
dtrain.init(backend="torch", timeout=60)
r, n = dtrain.rank(), dtrain.world_size()
assert dtrain.comm.group.current().backend == "torch"
assert dtrain.comm.group.current().world.transport_to((r + 1) % n) == "gloo"
for dtype in (torch.float32, torch.float64, torch.int64, torch.float16, torch.bfloat16):
    for op in OPS:
        if op == "avg" and not dtype.is_floating_point:
            continue
        for size in (0, 1, 7, 100003):
            inputs = [rank_input(size + 3, j, dtype, size, op) for j in range(n)]
            got = dtrain.allreduce(inputs[r].clone(), op=op)
            check(got, inputs, op, dtype, what=f"torch backend allreduce {dtype} {op} n={size}")
work = dtrain.allreduce(torch.full((1001,), float(r)), async_op=True)
assert torch.equal(work.wait(timeout=30), torch.full((1001,), float(sum(range(n)))))
b = torch.full((5,), float(r))
dtrain.broadcast(b, root=n - 1)
assert b.tolist() == [float(n - 1)] * 5
g = dtrain.allgather(torch.full((r + 1, 2), float(r)))
assert g[:, 0].tolist() == [float(k) for k in range(n) for _ in range(k + 1)], g
rs = dtrain.reduce_scatter(torch.arange(2.0 * n) + r)
assert rs.tolist() == [2.0 * r * n + sum(range(n)), (2.0 * r + 1) * n + sum(range(n))], rs
rows = torch.stack([torch.tensor([100.0 * r + i, 0.5]) for i in range(n)])  # row i goes to rank i
out = dtrain.alltoall(rows)
assert out[:, 0].tolist() == [100.0 * j + r for j in range(n)], out
if n > 1:
    if r == 0:
        dtrain.send(torch.arange(4.0), dst=1)
    elif r == 1:
        assert dtrain.recv(torch.empty(4), src=0).tolist() == [0.0, 1.0, 2.0, 3.0]
evens = dtrain.new_group([j for j in range(n) if j % 2 == 0])
odds = dtrain.new_group([j for j in range(n) if j % 2 == 1])
mine = evens if r % 2 == 0 else odds
assert dtrain.allreduce(torch.tensor([float(r)]), group=mine).item() == sum(mine.ranks)
dtrain.barrier()
print(f"ok rank {r} of {n}", flush=True)
dtrain.shutdown()
