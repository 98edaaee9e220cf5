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


def train(strategy, stage, opt, steps, rows, first=0):
    losses = []
    for step in range(first, first + steps):
        x, y = data(step, rows)
        opt.zero_grad()
        loss = strategy.train_step((x, y), F.cross_entropy)
        opt.step()
        losses.append(loss.item())
    return losses


def pipeline_run(schedule, micro_batches, opt_kind, rows=10, checkpoint=False, steps=10):
    """(this stage's state_dict, the losses every rank saw, stats) after `steps` pipeline steps."""
    strategy = dtrain.PipelineStrategy(micro_batches=micro_batches, schedule=schedule, track_memory=True,
                                       checkpoint_activations=checkpoint)
    model = mlp()
    opt = make_opt(opt_kind, model.parameters())
    stage, opt = strategy.prepare(model, opt)
    losses = train(strategy, stage, opt, steps, rows)
    return {k: v.clone() for k, v in stage.state_dict().items()}, losses, strategy.stats()


def parity_runs(configs, steps):
    """pipeline_run for each config in turn, on one set of ranks."""
    out = [pipeline_run(*c, steps=steps) for c in configs]
    dtrain.shutdown()
    return out


def wide(seed=0, d=256, layers=8):
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(d, d), nn.Tanh()]
    return nn.Sequential(*mods)


def saved_bytes(m, rows=64, d=256):
    """Per schedule: (peak saved bytes, peak micro-batches in flight) of one step, and the bytes one
    micro-batch saves on this stage (a one-micro-batch step)."""
    out = {}
    x = torch.randn(rows, d)
    for schedule, mb in (("gpipe", m), ("1f1b", m), ("gpipe", 1)):
        strategy = dtrain.PipelineStrategy(micro_batches=mb, schedule=schedule, track_memory=True)
        stage, _ = strategy.prepare(wide(), None)
        strategy.train_step((x[: rows // m] if mb == 1 else x, torch.zeros(rows // m if mb == 1 else rows, d)),
                            F.mse_loss)
        st = strategy.stats()
        out[(schedule, mb)] = (st["peak_saved_bytes"], st["peak_in_flight"])
    dtrain.shutdown()
    return out


class Sleep(nn.Module):
    """A layer that takes `ms` milliseconds and changes nothing, for balance='time'."""

    def __init__(self, ms):
        super().__init__()
        self.ms = ms

    def forward(self, x):
        import time
        time.sleep(self.ms / 1000)
        return x + 0


def balances():
    """The layers each balance gives this stage."""
    out = {}
    heavy = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 64), nn.Linear(64, 64))
    slow = nn.Sequential(Sleep(1), Sleep(1), Sleep(1), Sleep(30), Sleep(1))
    for name, model, balance, sample in (("params", heavy, "params", None), ("time", slow, "time", torch.zeros(2, 4)),
                                         ("list", heavy, [1, 4], None), ("even", heavy, None, None)):
        strategy = dtrain.PipelineStrategy(micro_batches=2, balance=balance)
        strategy.prepare(model, None, sample=sample)
        out[name] = strategy.layers
    dtrain.shutdown()
    return out


def resume(path, schedule):
    """(losses and state of 8 uninterrupted steps, the same after 4 steps, save, a fresh model and
    strategy loading it, 4 more steps), and the error a checkpoint from another layout gives."""
    def fresh(balance=None):
        strategy = dtrain.PipelineStrategy(micro_batches=3, schedule=schedule, balance=balance)
        model = mlp(seed=1)
        opt = make_opt("adam", model.parameters())
        stage, opt = strategy.prepare(model, opt)
        return strategy, stage, opt

    s, stage, opt = fresh()
    whole = train(s, stage, opt, 8, 9)
    whole_state = {k: v.clone() for k, v in stage.state_dict().items()}

    s, stage, opt = fresh()
    first = train(s, stage, opt, 4, 9)
    file = s.save(path, optimizer=opt, step=4)
    torch.manual_seed(123)  # the fresh model differs: only the checkpoint can make it right
    s, stage, opt = fresh()
    meta = s.load(path, optimizer=opt)
    rest = train(s, stage, opt, 4, 9, first=meta["step"])
    state = {k: v.clone() for k, v in stage.state_dict().items()}

    count = dtrain.world_size()
    other = [len(mlp()) - (count - 1)] + [1] * (count - 1)
    s, stage, opt = fresh(balance=other)
    try:
        s.load(path, optimizer=opt)
        err = None
    except dtrain.ConfigError as e:
        err = str(e)
    dtrain.shutdown()
    return whole, whole_state, first + rest, state, file, err
