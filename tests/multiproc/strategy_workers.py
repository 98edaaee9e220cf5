"""Rank functions for the AllReduceStrategy tests (importable, for spawn).

Each compares the distributed run with one process training on the concatenated
batch, computed inside the same rank from the same seed, so nothing but the
strategy differs between the two.
"""

import copy
import os
import signal

import torch
import torch.nn as nn
import torch.nn.functional as F

import dtrain

GLOBAL_BATCH = 12


class Net(nn.Module):
    """conv, linear, a tied weight, an unused parameter, and two branches whose creation
    order (so the order their gradient hooks fire) can differ per rank."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Linear(256, 16)
        self.b = nn.Linear(256, 16)
        self.l1 = nn.Linear(16, 16)
        self.l2 = nn.Linear(16, 16)
        self.l2.weight = self.l1.weight  # tied
        self.unused = nn.Linear(5, 5)
        self.head = nn.Linear(16, 10)
        self.flip = False

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        if self.flip:
            hb = torch.relu(self.b(h))
            ha = torch.tanh(self.a(h))
        else:
            ha = torch.tanh(self.a(h))
            hb = torch.relu(self.b(h))
        h = ha + hb
        h = self.l2(F.relu(self.l1(h)))
        return self.head(h)


def batch(step, n=GLOBAL_BATCH):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def make_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-3)


def shard(t, rank, world):
    per = t.shape[0] // world
    return t[rank * per:(rank + 1) * per]


def reference_run(opt_kind, steps):
    torch.manual_seed(0)
    model = Net()
    opt = make_opt(opt_kind, model.parameters())
    grads = []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))
        opt.step()
    return model, grads


def parity(opt_kind, compression, error_feedback, steps, bucket_mb=0.01):
    """Trains `steps` steps distributed and once in-process on the whole batch.

    Returns (max |param difference| over all parameters, unused.grad is None,
    reference's largest gradient per step, number of fp16 redos).
    """
    torch.set_num_threads(1)
    strategy = dtrain.AllReduceStrategy(compression=compression, error_feedback=error_feedback, bucket_mb=bucket_mb)
    r, w = strategy.rank, strategy.world_size
    torch.manual_seed(123 + r)  # different on purpose: prepare must broadcast rank 0's weights
    model = Net()
    model.flip = r % 2 == 1
    if r == 0:
        torch.manual_seed(0)
        model.load_state_dict(Net().state_dict())
    opt = make_opt(opt_kind, model.parameters())
    model, opt = strategy.prepare(model, opt)
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(model(shard(x, r, w)), shard(y, r, w)).backward()
        opt.step()
    ref, grads = reference_run(opt_kind, steps)
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    return diff, model.unused.weight.grad is None, grads, strategy.reducer.fp32_redos, \
        strategy.reducer.inplace_reductions


def no_sync_accumulation(micro):
    """`micro` micro-batches, all but the last under no_sync, against one process's sum of losses."""
    torch.set_num_threads(1)
    strategy = dtrain.AllReduceStrategy(bucket_mb=0.01)
    r, w = strategy.rank, strategy.world_size
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    model, _ = strategy.prepare(model)
    x, y = batch(7, GLOBAL_BATCH * micro)
    xs, ys = x.chunk(micro), y.chunk(micro)
    for k in range(micro):
        loss = F.cross_entropy(model(shard(xs[k], r, w)), shard(ys[k], r, w))
        if k < micro - 1:
            with strategy.no_sync(model):
                loss.backward()
            # nothing was reduced: the gradient is still this rank's own
        else:
            loss.backward()
    for k in range(micro):
        F.cross_entropy(ref(xs[k]), ys[k]).backward()
    return max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())
               if q.grad is not None)


def partly_used(bucket_mb=25):
    """A parameter only rank 0 uses: every rank gets rank 0's gradient / world; one nobody uses stays None."""
    torch.set_num_threads(1)
    strategy = dtrain.AllReduceStrategy(bucket_mb=bucket_mb)
    r, w = strategy.rank, strategy.world_size
    torch.manual_seed(0)
    lin, extra, never = nn.Linear(4, 1), nn.Linear(4, 1), nn.Linear(4, 1)
    model = nn.ModuleList([lin, extra, never])
    model, opt = strategy.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.ones(2, 4)
    out = lin(x).sum()
    if r == 0:
        out = out + extra(x).sum()
    opt.zero_grad()
    out.backward()
    got = extra.weight.grad.clone()
    opt.step()
    return got.tolist(), never.weight.grad is None, lin.weight.grad.tolist()


def no_grad_rank():
    """Rank 1's backward reaches no parameter; its step() must still take part."""
    torch.set_num_threads(1)
    strategy = dtrain.AllReduceStrategy()
    torch.manual_seed(0)
    lin = nn.Linear(3, 1)
    model, opt = strategy.prepare(lin, torch.optim.SGD(lin.parameters(), lr=1.0))
    opt.zero_grad()
    if strategy.rank == 0:
        lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    return lin.weight.detach().tolist()


def train_with_checkpoint(folder, steps, save_at, resume):
    """A shuffled, dropout-using run; returns the per-step losses (from `save_at` on when resuming)."""
    torch.set_num_threads(1)
    strategy = dtrain.AllReduceStrategy(bucket_mb=0.01)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, opt = strategy.prepare(model, opt)
    g = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.randn(40, 8, generator=g), torch.randint(0, 2, (40,), generator=g))
    loader = strategy.distribute(data, batch_size=4, seed=11)
    torch.manual_seed(100 + strategy.rank)  # dropout differs per rank; the checkpoint keeps each rank's
    start, epoch = 0, 0
    if resume:
        state = strategy.load(folder, model=model, optimizer=opt)
        start, epoch = state["step"], state["epoch"]
        loader.sampler.set_epoch(epoch)
    losses = []
    step = start
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(strategy.reduce_metrics({"loss": loss.item()})["loss"])
            step += 1
            if step >= steps:
                break
        epoch += 1
        if step == save_at and not resume:
            strategy.save(folder, model=model, optimizer=opt, step=step, epoch=epoch)
    return losses, [p.detach().clone() for p in model.parameters()]


def save_forever(folder, mib):
    """Saves ever-new checkpoints of about `mib` MiB until killed (the kill-during-save test)."""
    torch.set_num_threads(1)
    strategy = dtrain.LocalStrategy()
    model = nn.Linear(1024, mib * 256, bias=False)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(float(step))
        strategy.save(folder, model=model, step=step)
        print(step, flush=True)


def metrics_and_sharding(n_items, batch_size):
    torch.set_num_threads(1)
    strategy = dtrain.AllReduceStrategy()
    data = torch.utils.data.TensorDataset(torch.arange(n_items))
    loader = strategy.distribute(data, batch_size=batch_size, shuffle=False)
    seen = [int(v) for (b,) in loader for v in b]
    steps = len(loader)
    m = strategy.reduce_metrics({"rank": strategy.rank, "one": 1})
    return seen, steps, m


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    save_forever(os.environ["FOLDER"], int(os.environ.get("MIB", "32")))


def fp16_scale_range(factors):
    """Gradients whose size jumps by the given factors step to step, on the fp16 wire.

    Returns per step the largest error relative to the largest exact averaged gradient,
    and the count of buckets redone in float32 after an overflow.
    """
    torch.set_num_threads(1)
    strategy = dtrain.AllReduceStrategy(compression="fp16")
    r, w = strategy.rank, strategy.world_size
    p = nn.Parameter(torch.zeros(4099))
    model = nn.ParameterList([p])
    strategy.prepare(model)
    errors = []
    for step, c in enumerate(factors):
        weights = [torch.randn(4099, generator=torch.Generator().manual_seed(step * 10 + k)) for k in range(w)]
        exact = torch.stack([wk.double() for wk in weights]).mean(0) * c
        p.grad = None
        (p * weights[r] * c).sum().backward()
        errors.append(((p.grad.double() - exact).abs().max() / exact.abs().max()).item())
    return errors, strategy.reducer.fp32_redos


def big_gradient_parity(steps):
    """A model with one gradient over 1 MiB under the default bucket size: that gradient is
    reduced in .grad itself (its own bucket), the small ones in a shared bucket, and training
    still equals one process on the whole batch. Returns (max |param diff|, in-place
    reductions, the bucket layout as parameter-count lists)."""
    torch.set_num_threads(1)
    strategy = dtrain.AllReduceStrategy()
    r, w = strategy.rank, strategy.world_size

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 4100), nn.ReLU(), nn.Linear(4100, 10))

    model, ref = make(), make()
    opt, ref_opt = make_opt("sgd", model.parameters()), make_opt("sgd", ref.parameters())
    model, opt = strategy.prepare(model, opt)
    for step in range(steps):
        x, y = batch(step)
        for m, o, xs, ys in ((model, opt, shard(x, r, w), shard(y, r, w)), (ref, ref_opt, x, y)):
            o.zero_grad()
            F.cross_entropy(m(xs), ys).backward()
            o.step()
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    return diff, strategy.reducer.inplace_reductions, [d["params"] for d in strategy.reducer.describe()]
