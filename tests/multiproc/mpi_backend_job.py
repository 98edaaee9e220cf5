"""Run under mpirun by tests/multiproc/test_mpi.py: every collective through backend="mpi"."""
import torch, dtrain
dtrain.init(backend="mpi", timeout=30)
r, n = dtrain.rank(), dtrain.world_size()
for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64):
    for count in (0, 1, 7, 100003):
        t = (torch.arange(count) % 50).to(dt) + r
        dtrain.allreduce(t)
        ref = ((torch.arange(count) % 50) * n + sum(range(n))).to(dt)
        assert torch.equal(t, ref), (dt, count)
t = torch.full((5,), float(r + 1)); w = dtrain.allreduce(t, op="avg", async_op=True); w.wait()
assert t.tolist() == [(n + 1) / 2] * 5
m = torch.tensor([float(r)]); dtrain.allreduce(m, op="max"); assert m.item() == n - 1
b = torch.full((3,), float(r)); dtrain.broadcast(b, root=n - 1); assert b.tolist() == [n - 1.0] * 3
g = dtrain.allgather(torch.full((r + 1,), float(r)))
assert g.tolist() == [float(k) for k in range(n) for _ in range(k + 1)]
rs = dtrain.reduce_scatter(torch.arange(2.0 * n) + r)
assert rs.tolist() == [(2.0 * r + i) * n + sum(range(n)) for i in range(2)], rs
a = dtrain.alltoall(torch.arange(n, dtype=torch.float32) + 100 * r)
assert a.tolist() == [100.0 * k + r for k in range(n)], a
if n > 1:
    if r == 0: dtrain.send(torch.tensor([42.0]), dst=1)
    if r == 1: x = dtrain.recv(torch.zeros(1), src=0); assert x.item() == 42.0
pair = dtrain.new_group([0, 1]) if n > 1 else None
if pair is not None and r < 2:
    p = torch.tensor([float(r)]); dtrain.allreduce(p, group=pair); assert p.item() == 1.0
dtrain.barrier()
print(f"ok rank {r} of {n} local {dtrain.local_rank()} transport {dtrain.comm.group.current().world.transport_to(0)}", flush=True)
dtrain.shutdown()
