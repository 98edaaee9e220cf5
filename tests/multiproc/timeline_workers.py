"""Rank functions for test_timeline: a few AllReduceStrategy steps with a timeline."""

import time

import torch

import dtrain

# Large enough that backward (~15 ms a step on one thread) outlasts the progress thread's
# wake-up even with 3 ranks on 2 cores, so some bucket's transfer starts inside it.
BATCH = 512


def model():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [torch.nn.Linear(256, 256), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(256, 10))


def traced_steps(path, steps, compression, bucket_mb, sleep_rank=-1, sleep_s=0.0):
    """`steps` steps with a timeline at `path`; rank `sleep_rank` sleeps `sleep_s` before the
    last backward. Returns (stats, seconds per step, ranks' parameter checksum)."""
    torch.set_num_threads(1)
    dtrain.init()
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    s = dtrain.AllReduceStrategy(compression=compression, bucket_mb=bucket_mb, timeline=path)
    m, opt = s.prepare(m, opt)
    g = torch.Generator().manual_seed(dtrain.rank())
    t0 = time.perf_counter()
    for i in range(steps):
        x, y = torch.randn(BATCH, 256, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        if i == steps - 1 and dtrain.rank() == sleep_rank:
            time.sleep(sleep_s)
        loss.backward()
        opt.step()
    sec = (time.perf_counter() - t0) / steps
    stats = s.stats()
    check = float(sum(p.detach().double().sum() for p in m.parameters()))
    dtrain.shutdown()
    return stats, sec, check
