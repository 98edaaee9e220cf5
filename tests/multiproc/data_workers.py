"""Rank functions for the input-pipeline tests (importable, for spawn)."""

import torch

import dtrain


def shard_and_step(paths, drop_last, global_shuffle, epochs):
    """Each rank reads its share through strategy.distribute and allreduces once per step,
    as a training loop does: if one rank had a step more, it would wait alone and time out."""
    from dtrain import data
    torch.set_num_threads(1)
    dtrain.init(timeout=30)
    strategy = dtrain.AllReduceStrategy()
    ds = data.TFRecordDataset(paths, {"id": data.FixedLen((), "int64")}, workers=2)
    if global_shuffle:
        ds = ds.shuffle(global_=True, seed=7)
    ds = strategy.distribute(ds.batch(3), drop_last=drop_last)
    out = []
    for _ in range(epochs):
        steps, ids = 0, []
        for b in ds:
            steps += 1
            ids += b["id"].tolist()
            dtrain.allreduce(torch.ones(1))
        out.append((steps, ids))
    return out
