"""Rank functions for the pipeline and tensor-parallel tests (importable, for spawn)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import dtrain


class Pair(nn.Module):
    """Turns a tensor into a (tensor, dict) structure, so stages pass more than one tensor."""

    def forward(self, x):
        return (x, {"scale": x.tanh(), "ids": torch.arange(x.shape[0])})


class Unpair(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, xs):
        x, extra = xs
        assert extra["ids"].dtype == torch.int64
        return self.lin(x) * extra["scale"]


def mlp(seed=0, d=12, out=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, d), nn.Tanh(), Pair(), Unpair(d), nn.Linear(d, d), nn.GELU(),
                         nn.Linear(d, d), nn.Tanh(), nn.Linear(d, out))


def data(step, rows=10):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(rows, 7, generator=g), torch.randint(0, 5, (rows,), generator=g)


def make_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


def reference(opt_kind, steps=10, rows=10):
    """One process, the whole batch: the parameters and losses pipelines must reproduce."""
    model = mlp()
    opt = make_opt(opt_kind, model.parameters())
    losses = []
    for step in range(steps):
        x, y = data(step, rows)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {k: v.clone() for k, v in model.state_dict().items()}, losses


def pipeline_parity(schedule, micro_batches, opt_kind, steps=10, rows=10):
    strategy = dtrain.PipelineStrategy(micro_batches=micro_batches, schedule=schedule, track_memory=True)
    model = mlp()
    opt = make_opt(opt_kind, model.parameters())
    stage, opt = strategy.prepare(model, opt)
    losses = []
    for step in range(steps):
        x, y = data(step, rows)
        opt.zero_grad()
        loss = strategy.train_step((x, y), F.cross_entropy)
        opt.step()
        losses.append(loss.item())
    st = strategy.stats()
    dtrain.shutdown()
    return {k: v.clone() for k, v in stage.state_dict().items()}, losses, st
