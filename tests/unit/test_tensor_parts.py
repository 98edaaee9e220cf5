"""Tensor-parallel layers on a world of one rank: each is the torch layer it was cut from (the
mappings short-circuit, no communication), the split arithmetic, and the errors bad input gets."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dtrain
from dtrain.errors import ConfigError
from dtrain.parallel import Mesh
from dtrain.parallel.tensor import (ColumnParallelLinear, ParallelSelfAttention, RowParallelLinear,
                                    VocabParallelEmbedding, copy_to_region, gather_from_region,
                                    reduce_from_region, scatter_to_region, vocab_parallel_cross_entropy)
from dtrain.parallel.tensor.mappings import bounds, split_sizes


@pytest.fixture
def world():
    dtrain.init()
    yield
    dtrain.shutdown()


@pytest.mark.parametrize("n,parts", [(0, 1), (1, 2), (7, 3), (12, 4), (5, 5)])
def test_split_sizes_match_tensor_split(n, parts):
    want = [len(c) for c in torch.tensor_split(torch.arange(n), parts)]
    assert split_sizes(n, parts) == want
    assert [bounds(n, parts, i)[1] - bounds(n, parts, i)[0] for i in range(parts)] == want
    assert bounds(n, parts, parts - 1)[1] == n


def test_a_group_of_one_is_the_torch_layer(world):
    x = torch.randn(3, 4, 6)
    for make_ours, make_theirs in (
            (lambda: ColumnParallelLinear(6, 5), lambda: nn.Linear(6, 5)),
            (lambda: RowParallelLinear(6, 5), lambda: nn.Linear(6, 5)),
            (lambda: ColumnParallelLinear(6, 5, bias=False, gather_output=False), lambda: nn.Linear(6, 5, bias=False))):
        torch.manual_seed(1)
        ours = make_ours()
        torch.manual_seed(1)
        theirs = make_theirs()
        assert torch.equal(ours(x), theirs(x))
    torch.manual_seed(2)
    emb = VocabParallelEmbedding(9, 3, padding_idx=0)
    torch.manual_seed(2)
    ref = nn.Embedding(9, 3, padding_idx=0)
    ids = torch.tensor([[0, 8, 3]])
    assert torch.equal(emb(ids), ref(ids))
    for f in (copy_to_region, reduce_from_region, scatter_to_region, gather_from_region):
        assert f(x) is x  # no communication, no copy


def test_from_linear_copies_the_slice():
    lin = nn.Linear(4, 6)
    col = ColumnParallelLinear.from_linear(lin, group=_FakeGroup(1, 2))
    row = RowParallelLinear.from_linear(lin, input_is_parallel=True, group=_FakeGroup(1, 2))
    assert torch.equal(col.weight, lin.weight[3:]) and torch.equal(col.bias, lin.bias[3:])
    assert torch.equal(row.weight, lin.weight[:, 2:]) and torch.equal(row.bias, lin.bias)
    col.weight.data.zero_()
    assert lin.weight.abs().sum() > 0  # a copy, not a view
    emb = VocabParallelEmbedding.from_embedding(nn.Embedding(5, 2), group=_FakeGroup(0, 2))
    assert emb.weight.shape == (3, 2) and (emb.lo, emb.hi) == (0, 3)


class _FakeGroup:
    """Only the rank and size a layer reads when it cuts its weights (no collective is called)."""

    def __init__(self, rank, size):
        self.rank, self.size, self.ranks = rank, size, list(range(size))


def test_cross_entropy_on_one_rank_is_torchs(world):
    logits = torch.randn(2, 5, 7, requires_grad=True)
    target = torch.randint(0, 7, (2, 5))
    target[0, 0] = -100
    ours = vocab_parallel_cross_entropy(logits, target)
    theirs = F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1))
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert vocab_parallel_cross_entropy(logits, target, reduction="sum").item() == pytest.approx(
        F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1), reduction="sum").item(), abs=1e-5)


def test_bad_input_gets_clear_errors(world):
    with pytest.raises(ConfigError, match="heads=3 cannot be shared evenly by 2"):
        ParallelSelfAttention(6, 3, group=_FakeGroup(0, 2))
    with pytest.raises(ConfigError, match="d=10 must divide into heads=3"):
        ParallelSelfAttention(10, 3)
    with pytest.raises(ConfigError, match="out_features=2 cannot be split across 3 tensor-parallel ranks"):
        ColumnParallelLinear(4, 2, group=_FakeGroup(0, 3))
    row = RowParallelLinear(6, 2, input_is_parallel=True, group=_FakeGroup(0, 2))
    with pytest.raises(ConfigError, match="got a last dimension of 6, not 3"):
        row(torch.zeros(1, 6))
    emb = VocabParallelEmbedding(5, 2)
    with pytest.raises(ConfigError, match=r"ids must lie in \[0, 5\), got values from 0 to 5"):
        emb(torch.tensor([0, 5]))
    with pytest.raises(ConfigError, match="integer ids"):
        emb(torch.zeros(2))
    with pytest.raises(ConfigError, match="target of shape"):
        vocab_parallel_cross_entropy(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"targets must lie in \[0, 5\)"):
        vocab_parallel_cross_entropy(torch.zeros(2, 5), torch.tensor([1, 9]))
    with pytest.raises(ConfigError, match="reduction must be"):
        vocab_parallel_cross_entropy(torch.zeros(2, 5), torch.tensor([1, 2]), reduction="avg")
    with pytest.raises(ConfigError, match="Mesh\\(model=2\\) needs a positive divisor of the world size 1"):
        Mesh(model=2)
    mesh = Mesh(model=1)
    assert (mesh.model_rank, mesh.data_rank, mesh.model.ranks, mesh.data.ranks) == (0, 0, [0], [0])
