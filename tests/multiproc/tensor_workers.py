"""Rank functions for the tensor-parallel and 2 x 2 hybrid tests (importable, for spawn).

Each compares a split computation with the unsplit torch one built from the same seed on the
same rank, and returns the largest differences."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import dtrain
from dtrain.parallel import Mesh
from dtrain.parallel.tensor import (ColumnParallelLinear, ParallelMLP, ParallelSelfAttention,
                                    VocabParallelEmbedding, copy_to_region, gather_from_region, reduce_from_region,
                                    scatter_to_region, vocab_parallel_cross_entropy)
from dtrain.parallel.tensor.mappings import bounds


def _diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def mappings(width):
    """Each mapping's forward and backward against what it must compute, for a (3, width) input."""
    dtrain.init()
    size, rank = dtrain.world_size(), dtrain.rank()
    lo, hi = bounds(width, size, rank)
    torch.manual_seed(7)
    whole = torch.randn(3, width)                       # the same on every rank
    mine = torch.randn(3, width) + rank                  # different on every rank
    out = {}

    x = whole.clone().requires_grad_()
    y = scatter_to_region(x)
    (y * (rank + 1)).sum().backward()                   # d/dx: rank r's slice gets r + 1
    want_grad = torch.cat([torch.full((3, b - a), float(r + 1)) for r, (a, b) in
                           enumerate(bounds(width, size, r) for r in range(size))], dim=1)
    out["scatter"] = max(_diff(y, whole[:, lo:hi]), _diff(x.grad, want_grad))

    x = whole[:, lo:hi].clone().requires_grad_()
    y = gather_from_region(x)
    (y * torch.arange(width, dtype=torch.float32)).sum().backward()
    out["gather"] = max(_diff(y, whole), _diff(x.grad, torch.arange(lo, hi, dtype=torch.float32).expand(3, -1)))

    x = mine.clone().requires_grad_()
    y = reduce_from_region(x)
    (y * 2).sum().backward()
    total = dtrain.allreduce(mine.clone())
    out["reduce"] = max(_diff(y, total), _diff(x.grad, torch.full_like(mine, 2.0)))

    x = whole.clone().requires_grad_()
    y = copy_to_region(x)
    (y * (rank + 1)).sum().backward()
    out["copy"] = max(_diff(y, whole), _diff(x.grad, torch.full_like(whole, size * (size + 1) / 2)))
    dtrain.shutdown()
    return out


def _grads_vs(split_params, ref_params, cuts):
    """Largest difference between each split parameter's gradient and its slice of the reference's."""
    worst = 0.0
    for p, r, cut in zip(split_params, ref_params, cuts):
        worst = max(worst, _diff(p.grad, r.grad[cut]))
    return worst


def blocks(d, hidden, heads):
    """(MLP output, input grad, param grads), the same for attention: differences from unsplit."""
    dtrain.init()
    size, rank = dtrain.world_size(), dtrain.rank()
    out = {}
    torch.manual_seed(3)
    x = torch.randn(2, 5, d)

    torch.manual_seed(11)
    mlp = ParallelMLP(d, hidden)
    torch.manual_seed(11)
    ref_up, ref_down = nn.Linear(d, hidden), nn.Linear(hidden, d)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = mlp(xa)
    yb = ref_down(F.gelu(ref_up(xb)))
    (ya.square().sum() + ya.sum()).backward()
    (yb.square().sum() + yb.sum()).backward()
    h = slice(*bounds(hidden, size, rank))
    out["mlp"] = (_diff(ya, yb), _diff(xa.grad, xb.grad),
                  _grads_vs([mlp.up.weight, mlp.up.bias, mlp.down.weight, mlp.down.bias],
                            [ref_up.weight, ref_up.bias, ref_down.weight, ref_down.bias],
                            [h, h, (slice(None), h), slice(None)]))

    torch.manual_seed(12)
    att = ParallelSelfAttention(d, heads)
    torch.manual_seed(12)
    q, k, v, o = (nn.Linear(d, d) for _ in range(4))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = att(xa)
    b, t, _ = x.shape
    split = [layer(xb).view(b, t, heads, d // heads).transpose(1, 2) for layer in (q, k, v)]
    yb = o(F.scaled_dot_product_attention(*split, is_causal=True).transpose(1, 2).reshape(b, t, d))
    (ya.square().sum() + ya.sum()).backward()
    (yb.square().sum() + yb.sum()).backward()
    c = slice(*bounds(d, size, rank))
    out["attention"] = (_diff(ya, yb), _diff(xa.grad, xb.grad),
                        _grads_vs([att.q.weight, att.k.bias, att.v.weight, att.out.weight, att.out.bias],
                                  [q.weight, k.bias, v.weight, o.weight, o.bias], [c, c, c, (slice(None), c), slice(None)]))
    dtrain.shutdown()
    return out


def vocab(num, dim):
    """VocabParallelEmbedding and vocab_parallel_cross_entropy (with ignored targets) against
    nn.Embedding and F.cross_entropy: (output, weight grad, loss, logits grad) differences."""
    dtrain.init()
    size, rank = dtrain.world_size(), dtrain.rank()
    lo, hi = bounds(num, size, rank)
    torch.manual_seed(5)
    ids = torch.randint(0, num, (4, 6))
    ids[0, :3] = 1  # padding rows
    torch.manual_seed(21)
    emb = VocabParallelEmbedding(num, dim, padding_idx=1)
    torch.manual_seed(21)
    ref = nn.Embedding(num, dim, padding_idx=1)
    ya, yb = emb(ids), ref(ids)
    (ya * torch.arange(dim)).sum().backward()
    (yb * torch.arange(dim)).sum().backward()
    out = {"embedding": (_diff(ya, yb), _diff(emb.weight.grad, ref.weight.grad[lo:hi]))}

    torch.manual_seed(9)
    logits = torch.randn(4, 6, num) * 3
    target = torch.randint(0, num, (4, 6))
    target[1, 2] = target[3, 0] = -100
    la = logits[..., lo:hi].clone().requires_grad_()
    lb = logits.clone().requires_grad_()
    a = vocab_parallel_cross_entropy(la, target)
    b = F.cross_entropy(lb.reshape(-1, num), target.reshape(-1))
    a.backward()
    b.backward()
    per = vocab_parallel_cross_entropy(logits[..., lo:hi], target, reduction="none")
    per_ref = F.cross_entropy(logits.reshape(-1, num), target.reshape(-1), reduction="none").reshape(4, 6)
    out["cross_entropy"] = (abs(a.item() - b.item()), _diff(la.grad, lb.grad[..., lo:hi]), _diff(per, per_ref))
    dtrain.shutdown()
    return out


# ---- 2 x 2 hybrids: a model trained on a (data x model) mesh against one process

VOCAB, D, T = 13, 8, 6


def lm_batch(step, rows=8):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randint(0, VOCAB, (rows, T), generator=g)
    return x, torch.roll(x, -1, dims=1)


class TinyLM(nn.Module):
    """Embedding -> attention -> MLP -> vocabulary head; tensor-parallel over `group`, or plain
    torch layers built in the same order when group is False."""

    def __init__(self, group=None):
        super().__init__()
        torch.manual_seed(0)
        if group is False:
            self.emb = nn.Embedding(VOCAB, D)
            self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
            self.up, self.down = nn.Linear(D, 20), nn.Linear(20, D)
            self.head = nn.Linear(D, VOCAB)
        else:
            self.emb = VocabParallelEmbedding(VOCAB, D, group=group)
            self.att = ParallelSelfAttention(D, 2, group=group)
            self.mlp = ParallelMLP(D, 20, group=group)
            self.head = ColumnParallelLinear(D, VOCAB, gather_output=False, group=group)
        self.group = group

    def forward(self, x, y):
        h = self.emb(x)
        if self.group is False:
            b, t, _ = h.shape
            split = [m(h).view(b, t, 2, D // 2).transpose(1, 2) for m in (self.q, self.k, self.v)]
            h = h + self.o(F.scaled_dot_product_attention(*split, is_causal=True).transpose(1, 2).reshape(b, t, D))
            h = h + self.down(F.gelu(self.up(h)))
            return F.cross_entropy(self.head(h).reshape(-1, VOCAB), y.reshape(-1))
        h = h + self.att(h)
        h = h + self.mlp(h)
        return vocab_parallel_cross_entropy(self.head(h), y, group=self.group)


def unsplit_state(model):
    """TinyLM(group=False)'s parameters, keyed as the tensor-parallel model names them."""
    sd = {"emb.weight": model.emb.weight, "head.weight": model.head.weight, "head.bias": model.head.bias}
    for ours, theirs in (("att.q", "q"), ("att.k", "k"), ("att.v", "v"), ("att.out", "o"),
                         ("mlp.up", "up"), ("mlp.down", "down")):
        layer = getattr(model, theirs)
        sd[ours + ".weight"], sd[ours + ".bias"] = layer.weight, layer.bias
    return {k: v.detach().clone() for k, v in sd.items()}


def lm_reference(steps):
    model = TinyLM(group=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(steps):
        x, y = lm_batch(step)
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return unsplit_state(model), losses


SLICES = {  # which slice of the unsplit parameter a tensor-parallel rank holds: rows, columns or all
    "emb.weight": 0, "head.weight": 0, "head.bias": 0, "att.q.weight": 0, "att.q.bias": 0, "att.k.weight": 0,
    "att.k.bias": 0, "att.v.weight": 0, "att.v.bias": 0, "att.out.weight": 1, "att.out.bias": None,
    "mlp.up.weight": 0, "mlp.up.bias": 0, "mlp.down.weight": 1, "mlp.down.bias": None,
}


def tensor_data_parallel(path, steps=6):
    """TinyLM on Mesh(model=2): tensor parallel inside a replica, AllReduceStrategy across them,
    each replica on half the batch. Returns (largest difference of this rank's slices from one
    process's parameters, loss differences, checkpoint resume difference)."""
    mesh = Mesh(model=2)
    ref, ref_losses = lm_reference(steps)

    def build():
        model = TinyLM(group=mesh.model)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        strategy = dtrain.AllReduceStrategy(group=mesh.data)
        model, opt = strategy.prepare(model, opt)
        return strategy, model, opt

    def train(strategy, model, opt, first, count):
        losses = []
        for step in range(first, first + count):
            x, y = lm_batch(step)
            rows = x.shape[0] // mesh.data_size
            mine = slice(mesh.data_rank * rows, (mesh.data_rank + 1) * rows)
            opt.zero_grad()
            loss = model(x[mine], y[mine])
            loss.backward()
            opt.step()
            losses.append(strategy.reduce_metrics({"loss": loss.item()})["loss"])
        return losses

    strategy, model, opt = build()
    losses = train(strategy, model, opt, 0, steps)
    worst = 0.0
    for key, value in model.state_dict().items():
        if key == "att.k.bias":
            # Its true gradient is 0 (a constant added to every key shifts a row's scores alike,
            # which softmax ignores), so what it gets is rounding noise, which Adam turns into
            # lr-sized steps in either implementation: nothing to compare.
            continue
        whole = ref[key]
        dim = SLICES[key]
        if dim is not None:
            lo, hi = bounds(whole.shape[dim], mesh.model_size, mesh.model_rank)
            whole = whole.narrow(dim, lo, hi - lo)
        worst = max(worst, _diff(value, whole))
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))

    # save half-way, resume into a fresh model, finish: the same parameters as straight through
    strategy, model, opt = build()
    train(strategy, model, opt, 0, steps // 2)
    shard = (mesh.model_rank, mesh.model_size)
    strategy.save(path, model=model, optimizer=opt, step=steps // 2, shard=shard)
    strategy, model2, opt2 = build()
    meta = strategy.load(path, model=model2, optimizer=opt2, shard=shard)
    train(strategy, model2, opt2, meta["step"], steps - meta["step"])
    straight_strategy, straight, straight_opt = build()
    train(straight_strategy, straight, straight_opt, 0, steps)
    resume = max(_diff(a, b) for a, b in zip(model2.state_dict().values(), straight.state_dict().values()))
    dtrain.shutdown()
    return worst, loss_diff, resume


def pipeline_data_parallel(steps=10):
    """pipeline_workers.mlp on Mesh(model=2): 2 pipeline stages x 2 replicas, each replica on
    half the batch. Returns (this stage's state, losses) for comparison with one process."""
    from tests.multiproc import pipeline_workers as pw
    mesh = Mesh(model=2)
    strategy = dtrain.PipelineStrategy(micro_batches=2, group=mesh.model)
    model = pw.mlp()
    opt = pw.make_opt("adam", model.parameters())
    stage, opt = strategy.prepare(model, opt)
    dp = dtrain.AllReduceStrategy(group=mesh.data)
    stage, opt = dp.prepare(stage, opt)
    losses = []
    for step in range(steps):
        x, y = pw.data(step, 12)
        rows = 12 // mesh.data_size
        mine = slice(mesh.data_rank * rows, (mesh.data_rank + 1) * rows)
        opt.zero_grad()
        loss = strategy.train_step((x[mine], y[mine]), F.cross_entropy)
        opt.step()
        losses.append(dp.reduce_metrics({"loss": loss.item()})["loss"])
    dtrain.shutdown()
    return {k: v.clone() for k, v in stage.state_dict().items()}, losses, dp.reducer.steps
