"""Strategy pieces that need no processes: sharding, checkpoints, LocalStrategy, argument checks."""

import os

import pytest
import torch

import dtrain
from dtrain.parallel import checkpoint
from dtrain.parallel.sharding import ShardedSampler


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 7, 10, 11])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_equal_counts_cover_everything(n, world, shuffle):
    samplers = [ShardedSampler(n, r, world, shuffle=shuffle, seed=3) for r in range(world)]
    shares = [list(s) for s in samplers]
    assert {len(s) for s in shares} == {-(-n // world)}
    assert all(len(s) == len(sm) for s, sm in zip(shares, samplers))
    assert set().union(*map(set, shares)) == set(range(n))
    if n % world == 0:  # no padding: a partition
        assert sorted(i for s in shares for i in s) == list(range(n))


def test_sampler_drop_last_and_reshuffle_per_epoch():
    s = ShardedSampler(11, 1, 3, shuffle=True, seed=0, drop_last=True)
    first, second = list(s), list(s)
    assert len(first) == len(second) == 3
    assert first != second, "the permutation must change from epoch to epoch"
    s.set_epoch(0)
    assert list(s) == first, "set_epoch must replay an epoch exactly"
    others = [ShardedSampler(11, r, 3, shuffle=True, seed=0, drop_last=True) for r in (0, 2)]
    union = set(first) | set(list(others[0])) | set(list(others[1]))
    assert len(union) == 9, "ranks must draw disjoint samples from the same permutation"


def test_sampler_errors():
    with pytest.raises(dtrain.ConfigError, match="empty"):
        ShardedSampler(0, 0, 2)
    with pytest.raises(dtrain.ConfigError, match="drop_last=True leaves no sample"):
        ShardedSampler(2, 0, 3, drop_last=True)
    with pytest.raises(dtrain.ConfigError, match="outside a world"):
        ShardedSampler(5, 3, 3)


def test_local_distribute_dataset_and_loader():
    data = torch.utils.data.TensorDataset(torch.arange(10))
    s = dtrain.LocalStrategy()
    loader = s.distribute(data, batch_size=4, shuffle=False)
    assert [b[0].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    rebuilt = s.distribute(torch.utils.data.DataLoader(data, batch_size=3, shuffle=True))
    got = sorted(int(v) for (b,) in rebuilt for v in b)
    assert got == list(range(10)) and rebuilt.batch_size == 3
    with pytest.raises(dtrain.ConfigError, match="takes a torch Dataset"):
        s.distribute(42)
    with pytest.raises(dtrain.ConfigError, match="IterableDataset"):
        class It(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(range(3))
        s.distribute(It(), batch_size=1)


def test_local_save_load_roundtrip(tmp_path):
    s = dtrain.LocalStrategy()
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(7)
    path = s.save(str(tmp_path / "ck"), model=model, optimizer=opt, step=5, epoch=2, note="hi")
    assert path.endswith("checkpoint.pt") and os.path.exists(path)
    expected_next = torch.rand(3)
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    torch.manual_seed(999)
    state = s.load(str(tmp_path / "ck"), model=model2, optimizer=opt2)
    assert state == {"step": 5, "epoch": 2, "note": "hi"}
    assert torch.equal(torch.rand(3), expected_next), "the RNG state was not restored"
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_checkpoint_errors(tmp_path):
    s = dtrain.LocalStrategy()
    with pytest.raises(dtrain.ConfigError, match="no checkpoint at"):
        s.load(str(tmp_path / "missing"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(dtrain.DataError, match="cannot be read"):
        s.load(str(bad))
    torch.save({"weights": 1}, str(tmp_path / "plain.pt"))
    with pytest.raises(dtrain.DataError, match="not a dtrain checkpoint"):
        s.load(str(tmp_path / "plain.pt"))
    s.save(str(tmp_path / "only_step.pt"), step=1)
    with pytest.raises(dtrain.ConfigError, match="no model state"):
        s.load(str(tmp_path / "only_step.pt"), model=torch.nn.Linear(1, 1))


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = str(tmp_path / "f.bin")
    checkpoint.atomic_write(target, b"old")

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(target, b"new contents")
    monkeypatch.undo()
    assert open(target, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"], "the failed write left its temporary file"


def test_reduce_metrics_local():
    s = dtrain.LocalStrategy()
    assert s.reduce_metrics({"loss": torch.tensor(0.5), "n": 3}) == {"loss": 0.5, "n": 3.0}
    assert s.rank == 0 and s.world_size == 1 and s.is_main


@pytest.mark.parametrize("kwargs,match", [
    ({"compression": "int8"}, "compression must be"),
    ({"bucket_mb": 0}, "bucket_mb must be"),
    ({"backend": "nccl"}, "backend 'nccl'"),
])
def test_allreduce_strategy_argument_errors(kwargs, match):
    with pytest.raises(dtrain.ConfigError, match=match):
        dtrain.AllReduceStrategy(**kwargs)


def test_allreduce_strategy_single_process_is_plain_training():
    s = dtrain.AllReduceStrategy(compression="fp16")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ref = torch.nn.Linear(4, 1)
    ref.load_state_dict(model.state_dict())
    model, opt = s.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert s.reducer is None  # nothing to reduce with one process
    x = torch.randn(8, 4)
    model(x).sum().backward()
    ref(x).sum().backward()
    assert torch.equal(model.weight.grad, ref.weight.grad)
    with pytest.raises(dtrain.ConfigError, match="takes a torch.nn.Module"):
        dtrain.AllReduceStrategy().prepare("model")


class _TwoRanks:
    size = 2  # all the reducer reads of its group while it builds buckets


@pytest.mark.parametrize("bucket_mb,compression,layout", [
    # 1 MiB and larger alone (reduced in .grad); the small ones between them share buckets
    (25, None, [["head.bias", "head.weight"], ["big.weight"], ["small.bias", "small.weight", "tiny.weight"]]),
    # small buckets: half a bucket is enough to stand alone
    (0.004, None, [["head.bias"], ["head.weight"], ["big.weight"], ["small.bias"], ["small.weight"],
                   ["tiny.weight"]]),
    # a compressed wire packs everything (the cast happens in the bucket)
    (25, "fp16", [["head.bias", "head.weight", "big.weight", "small.bias", "small.weight", "tiny.weight"]]),
])
def test_large_gradients_get_buckets_of_their_own(bucket_mb, compression, layout):
    from dtrain.parallel.data_parallel import _Reducer
    model = torch.nn.ModuleDict({
        "tiny": torch.nn.Linear(3, 1, bias=False),  # 12 bytes
        "small": torch.nn.Linear(40, 20),  # 3.2 KB + 80 B
        "big": torch.nn.Linear(1024, 256, bias=False),  # exactly 1 MiB
        "head": torch.nn.Linear(100, 30),  # 12 KB + 120 B
    })
    names = [n for n, _ in model.named_parameters()]
    r = _Reducer(list(model.parameters()), _TwoRanks(), int(bucket_mb * (1 << 20)), compression, False, True)
    try:
        assert [[names[i] for i in b.params] for b in r.buckets] == layout
        assert all(r._solo(b) == (len(b.params) == 1 and compression is None) for b in r.buckets)
    finally:
        r.remove()
