"""The pipeline's parts without processes: micro-batch splitting and flattening, the partition
search, the schedules' trade order (simulated across every stage: nothing waits forever), and
PipelineStrategy on a world of one rank, including the errors bad input gets."""

import itertools
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dtrain
from dtrain.errors import ConfigError
from dtrain.parallel.pipeline import microbatch, partition, schedules
from tests.multiproc import pipeline_workers as pw


# ---- micro-batches

@pytest.mark.parametrize("n,m", [(1, 1), (7, 1), (7, 3), (7, 7), (10, 4), (1001, 8)])
def test_split_matches_tensor_split_and_keeps_structure(n, m):
    x = torch.arange(n * 3).reshape(n, 3)
    batch = (x, {"mask": torch.arange(n) % 2 == 0, "scale": 0.5}, [x[:, 0]])
    parts = microbatch.split(batch, m)
    want = torch.tensor_split(x, m)
    assert len(parts) == m
    for part, w in zip(parts, want):
        assert torch.equal(part[0], w)
        assert torch.equal(part[1]["mask"], (w[:, 0] // 3) % 2 == 0)
        assert part[1]["scale"] == 0.5 and torch.equal(part[2][0], w[:, 0])
    assert sum(microbatch.rows(p) for p in parts) == n


def test_split_refuses_what_it_cannot_cut():
    with pytest.raises(ConfigError, match="3 samples, fewer than micro_batches=4"):
        microbatch.split(torch.zeros(3, 2), 4)
    with pytest.raises(ConfigError, match=r"inputs\[1\] has 4"):
        microbatch.split((torch.zeros(5), torch.zeros(4)), 2, "inputs")
    with pytest.raises(ConfigError, match="0-d tensor"):
        microbatch.split((torch.zeros(5), torch.tensor(1.0)), 2)
    with pytest.raises(ConfigError, match="no tensor"):
        microbatch.split({"a": 1}, 2)
    with pytest.raises(ConfigError, match="positive int"):
        microbatch.split(torch.zeros(4), 0)


def test_flatten_round_trips_and_skeletons_pickle():
    obj = (torch.zeros(2, 3, requires_grad=True), {"ids": torch.arange(2), "k": 3}, [torch.ones(2, dtype=torch.float16)])
    skeleton, tensors = microbatch.flatten(obj)
    assert len(tensors) == 3
    back = microbatch.unflatten(pickle.loads(pickle.dumps(skeleton)), tensors)
    assert back[0] is obj[0] and back[1]["k"] == 3 and back[2][0] is obj[2][0]
    specs = microbatch.leaves(skeleton)
    assert [s.requires_grad for s in specs] == [True, False, False]  # integers never want gradients
    assert microbatch.describe(skeleton) == "(float32(2, 3), {'ids': int64(2,), 'k': 3}, [float16(2,)])"


# ---- partitions

def _brute(weights, parts):
    n, best = len(weights), None
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0,) + cuts + (n,)
        worst = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_contiguous_partition_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    parts = int(torch.randint(1, n + 1, (1,), generator=g))
    weights = torch.rand(n, generator=g).tolist()
    counts = partition.contiguous(weights, parts)
    assert len(counts) == parts and sum(counts) == n and min(counts) >= 1
    bounds = [0] + list(itertools.accumulate(counts))
    worst = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert worst == pytest.approx(_brute(weights, parts))


def test_partition_counts_and_their_errors():
    layers = [nn.Linear(2, 2) for _ in range(5)]
    assert partition.counts_for(None, layers, 2, None) == [3, 2]
    assert partition.counts_for([1, 4], layers, 2, None) == [1, 4]
    heavy = [nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(50, 50)]
    assert partition.counts_for("params", heavy, 2, None) == [2, 1]
    with pytest.raises(ConfigError, match="cannot split 5 layers into 6"):
        partition.counts_for(None, layers, 6, None)
    with pytest.raises(ConfigError, match=r"balance=\[2, 2\] must give each of the 2 stages .* summing to the model's 5"):
        partition.counts_for([2, 2], layers, 2, None)
    with pytest.raises(ConfigError, match="positive number"):
        partition.counts_for([5, 0], layers, 2, None)
    with pytest.raises(ConfigError, match="sample="):
        partition.counts_for("time", layers, 2, None)
    with pytest.raises(ConfigError, match="'params' or 'time', got 'flops'"):
        partition.counts_for("flops", layers, 2, None)


# ---- schedules, simulated on every stage at once

class Recorder:
    """Stands in for a PipelineStage: records computations and trades, and checks that a stage
    only computes what it has received."""

    def __init__(self, index, count):
        self.index, self.count = index, count
        self.ops = []

    def _trade(self, link, send=None, recv=None):
        self.ops.append(("T", link, send, recv))

    def forward(self, mb):
        self.ops.append(("C", "F", mb))

    def backward(self, mb):
        self.ops.append(("C", "B", mb))

    def recv_forward(self, mb):
        if self.index > 0:
            self._trade("prev", recv=("F", mb))

    def send_forward(self, mb):
        if self.index < self.count - 1:
            self._trade("next", send=("F", mb))

    def recv_backward(self, mb):
        if self.index < self.count - 1:
            self._trade("next", recv=("B", mb))

    def send_backward(self, mb):
        if self.index > 0:
            self._trade("prev", send=("B", mb))

    def send_forward_recv_backward(self, f, b):
        if self.index < self.count - 1:
            self._trade("next", send=("F", f), recv=("B", b))

    def send_backward_recv_forward(self, b, f):
        if self.index > 0:
            self._trade("prev", send=("B", b), recv=("F", f))


def simulate(schedule, p, m):
    """Runs every stage's op list against its neighbours': a trade happens when both sides'
    next ops are the matching trade. Returns the per-stage op lists; fails on a deadlock or on a
    computation before its input arrived."""
    stages = [Recorder(s, p) for s in range(p)]
    for st in stages:
        schedule.run(st, m)
    at = [0] * p
    have = [set() for _ in range(p)]  # (kind, mb) received or computed
    for s in range(p):
        have[s] |= {("F", i) for i in range(m)} if s == 0 else set()
    progress = True
    while progress:
        progress = False
        for s in range(p):
            while at[s] < len(stages[s].ops) and stages[s].ops[at[s]][0] == "C":
                _, kind, mb = stages[s].ops[at[s]]
                need = ("F", mb) if kind == "F" else (("B", mb) if s < p - 1 else ("done F", mb))
                assert need in have[s], f"stage {s} runs {kind}{mb} before it has {need}"
                have[s].add(("done F", mb) if kind == "F" else ("done B", mb))
                at[s] += 1
                progress = True
            if at[s] == len(stages[s].ops) or s == p - 1:
                continue
            mine, theirs = stages[s].ops[at[s]], stages[s + 1].ops[at[s + 1]] if at[s + 1] < len(stages[s + 1].ops) else None
            if mine[1] == "next" and theirs is not None and theirs[0] == "T" and theirs[1] == "prev":
                assert mine[2] == theirs[3] and mine[3] == theirs[2], f"stages {s} and {s + 1} disagree: {mine} vs {theirs}"
                if mine[2] is not None:
                    assert ("done F", mine[2][1]) in have[s], f"stage {s} sends F{mine[2][1]} before computing it"
                    have[s + 1].add(mine[2])
                if mine[3] is not None:
                    assert ("done B", mine[3][1]) in have[s + 1], f"stage {s + 1} sends B{mine[3][1]} before computing it"
                    have[s].add(mine[3])
                at[s] += 1
                at[s + 1] += 1
                progress = True
    stuck = [(s, stages[s].ops[at[s]]) for s in range(p) if at[s] < len(stages[s].ops)]
    assert not stuck, f"{schedule.name} with {p} stages and {m} micro-batches deadlocks at {stuck}"
    return stages


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("p", [1, 2, 3, 5])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
def test_schedules_never_deadlock_and_hold_their_bound(name, p, m):
    schedule = schedules.get(name)
    for s, st in enumerate(simulate(schedule, p, m)):
        comp = [op for op in st.ops if op[0] == "C"]
        assert sorted(op[2] for op in comp if op[1] == "F") == list(range(m))
        assert sorted(op[2] for op in comp if op[1] == "B") == list(range(m))
        held = peak = 0
        for op in comp:
            held += 1 if op[1] == "F" else -1
            peak = max(peak, held)
        assert peak == schedule.in_flight_bound(p, s, m), (s, peak)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ConfigError, match="unknown pipeline schedule 'zb': use one of gpipe, 1f1b"):
        schedules.get("zb")


# ---- the strategy on one rank

@pytest.fixture
def world():
    dtrain.init()
    yield
    dtrain.shutdown()


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_one_stage_is_gradient_accumulation(world, schedule):
    ref, ref_losses = pw.reference("adam", 4, 9)
    state, losses, stats = pw.pipeline_run(schedule, 4, "adam", rows=9, steps=4)
    assert max((state[k] - ref[k]).abs().max().item() for k in ref) <= 1e-6
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5
    assert stats["layers"] == (0, len(pw.mlp())) and stats["peak_in_flight"] == (1 if schedule == "1f1b" else 4)


def test_eval_step_is_the_mean_loss_without_gradients(world):
    strategy = dtrain.PipelineStrategy(micro_batches=3)
    model = pw.mlp()
    stage, _ = strategy.prepare(model, None)
    x, y = pw.data(0, 10)
    with torch.no_grad():
        want = F.cross_entropy(pw.mlp()(x), y).item()
    got = strategy.eval_step((x, y), F.cross_entropy).item()
    assert got == pytest.approx(want, abs=1e-6)
    assert all(p.grad is None for p in stage.parameters())


def test_bad_input_gets_clear_errors(world):
    with pytest.raises(ConfigError, match="micro_batches must be a positive int, got 0"):
        dtrain.PipelineStrategy(micro_batches=0)
    with pytest.raises(ConfigError, match="unknown pipeline schedule"):
        dtrain.PipelineStrategy(schedule="interleaved")
    strategy = dtrain.PipelineStrategy(micro_batches=2)
    with pytest.raises(ConfigError, match="before train_step"):
        strategy.train_step((torch.zeros(2, 7), torch.zeros(2)), F.mse_loss)
    with pytest.raises(ConfigError, match="nn.Sequential or a list of stage modules, got Linear"):
        strategy.prepare(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="got 2 stage modules for a pipeline of 1 ranks"):
        strategy.prepare([nn.Linear(2, 2), nn.Linear(2, 2)])
    stage, _ = strategy.prepare(pw.mlp())
    with pytest.raises(ConfigError, match="already prepared"):
        strategy.prepare(pw.mlp())
    with pytest.raises(ConfigError, match=r"batch=\(inputs, targets\), got Tensor"):
        strategy.train_step(torch.zeros(4, 7), F.cross_entropy)
    with pytest.raises(ConfigError, match="1 samples, fewer than micro_batches=2"):
        strategy.train_step((torch.zeros(1, 7), torch.zeros(1, dtype=torch.long)), F.cross_entropy)
    with pytest.raises(ConfigError, match="loss_fn must return a scalar"):
        strategy.train_step((torch.zeros(4, 7), torch.zeros(4, dtype=torch.long)),
                            lambda out, y: F.cross_entropy(out, y, reduction="none"))


def test_optimizer_keeps_only_the_stage_and_stays_the_same_object(world):
    model = pw.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = dtrain.PipelineStrategy(micro_batches=2)
    stage, opt2 = strategy.prepare(model, opt)
    assert opt2 is opt
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in stage.parameters()}
    assert list(stage.state_dict()) == list(model.state_dict())  # one stage: every key, numbering kept
