"""dtrain.horovod in one process (a world of one): its rules, errors and the launcher's horovodrun flags."""

import os
import warnings

import pytest
import torch
import torch.nn as nn

import dtrain.horovod as hvd
from dtrain import _C
from dtrain.errors import ConfigError
from dtrain.launch import hosts as H
from dtrain.launch.cli import parser


@pytest.fixture
def one():
    hvd.init()
    yield
    hvd.shutdown()


def test_rank_before_init_names_the_fix():
    with pytest.raises(ValueError, match="hvd.init"):
        hvd.rank()


def test_world_of_one_is_identity(one):
    assert (hvd.rank(), hvd.size(), hvd.local_rank(), hvd.cross_size()) == (0, 1, 0, 1)
    t = torch.arange(5.0)
    assert torch.equal(hvd.allreduce(t), t) and torch.equal(hvd.allgather(t), t)
    assert torch.equal(hvd.broadcast(t, 0), t)
    assert hvd.join() == 0


def test_ops_have_horovods_values_and_average_is_resolved():
    assert (int(hvd.Average), int(hvd.Sum), int(hvd.Adasum), int(hvd.Min), int(hvd.Max), int(hvd.Product)) == \
        (0, 1, 2, 3, 4, 5)
    from dtrain.horovod.basics import resolve_op
    assert resolve_op(None, None) == hvd.Average
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert resolve_op(None, False) == hvd.Sum
    assert any(issubclass(m.category, DeprecationWarning) for m in w)
    with pytest.raises(ValueError, match="supersedes"):
        resolve_op(hvd.Sum, True)
    with pytest.raises(ValueError, match="unknown reduction op 17"):
        resolve_op(17, None)


def test_compression_round_trip():
    t = torch.randn(10, dtype=torch.float64)
    c, ctx = hvd.Compression.fp16.compress(t)
    assert c.dtype == torch.float16 and hvd.Compression.fp16.decompress(c, ctx).dtype == torch.float64
    i = torch.arange(3)
    assert hvd.Compression.fp16.compress(i)[0] is i
    assert hvd.Compression.none.compress(t)[0] is t


def test_distributed_optimizer_argument_errors(one):
    m = nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="sequence of tuples"):
        hvd.DistributedOptimizer(opt, named_parameters=list(m.parameters()))
    with pytest.raises(ValueError, match="must be unique. Found duplicates: w"):
        hvd.DistributedOptimizer(opt, named_parameters=[("w", m.weight), ("w", m.bias)])
    with pytest.raises(ValueError, match="were not named"):
        hvd.DistributedOptimizer(opt, named_parameters=[("w", m.weight)])
    with pytest.raises(ValueError, match="gradient_predivide_factor not supported with op != Average"):
        hvd.DistributedOptimizer(opt, op=hvd.Sum, gradient_predivide_factor=2.0)
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.DistributedOptimizer(opt, op=hvd.Adasum)
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        hvd.DistributedOptimizer(opt, backward_passes_per_step=0)


def test_distributed_optimizer_is_the_optimizers_class_sharing_its_state(one):
    m = nn.Linear(3, 2)
    base = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.ones(1, 3)).sum().backward()
    base.step()
    opt = hvd.DistributedOptimizer(base, named_parameters=m.named_parameters())
    assert isinstance(opt, torch.optim.Adam) and type(opt).__name__ == "Adam"
    assert opt.state is base.state and opt.param_groups is base.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    with pytest.raises(ConfigError, match="already"):
        hvd.DistributedOptimizer(opt)


def test_unregistered_process_set_is_refused(one):
    ps = hvd.ProcessSet([0])
    with pytest.raises(ValueError, match="not registered"):
        hvd.allreduce(torch.ones(1), process_set=ps)
    hvd.add_process_set(ps)
    assert ps.included() and ps.rank() == 0
    assert torch.equal(hvd.allreduce(torch.ones(2), process_set=ps), torch.ones(2))
    with pytest.raises(ValueError, match="out of range"):
        hvd.add_process_set(hvd.ProcessSet([0, 1]))


def test_init_with_a_communicator_is_refused():
    with pytest.raises(NotImplementedError, match="comm"):
        hvd.init(comm=[0])


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7, 3), (2, 3, 4, 5), (32767,), (32768,), (1, 1, 1, 1, 1)])
def test_shape_tag_is_exact_for_small_shapes_and_never_zero(shape):
    tag = _C.shape_tag(list(shape))
    assert tag != 0
    text = _C.describe_shape_tag(tag)
    if len(shape) <= 4 and all(d < 32768 for d in shape):
        assert text == "shape " + (str(tuple(shape)) if len(shape) != 1 else f"({shape[0]},)")
    else:
        assert text.startswith("shape #")
    assert _C.shape_tag([2, 3]) != _C.shape_tag([3, 2]) and _C.shape_tag([6]) != _C.shape_tag([6, 1])


@pytest.mark.parametrize("total, want", [(None, [("a", 2), ("b", 2)]), (3, [("a", 2), ("b", 1)]), (1, [("a", 1)]),
                                         (4, [("a", 2), ("b", 2)])])
def test_np_takes_the_first_slots_like_horovodrun(total, want):
    assert H.take_slots([("a", 2), ("b", 2)], total) == want


@pytest.mark.parametrize("total", [0, 5])
def test_np_beyond_the_slots_names_them(total):
    with pytest.raises(ConfigError, match=r"offer 4 slot\(s\), so -np must be 1..4"):
        H.take_slots([("a", 2), ("b", 2)], total)


def test_horovodrun_flags_parse():
    a = parser().parse_args(["-np", "4", "-H", "a:2,b:2", "--gloo", "--timeline-filename", "t.json", "-p", "2222",
                             "python", "train.py"])
    assert (a.nprocs, a.hosts, a.timeline_filename, a.ssh_port, a.command) == \
        (4, "a:2,b:2", "t.json", 2222, ["python", "train.py"])


def test_mpi_dry_run_uses_np_with_hosts(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", "--mpi", "--mpi-flavor", "openmpi", "--dry-run",
                        "-np", "3", "-H", "a:2,b:2", "train.py"], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    words = p.stdout.split()
    flag = "-np" if "-np" in words else "-n"
    assert words[words.index(flag) + 1] == "3", p.stdout
