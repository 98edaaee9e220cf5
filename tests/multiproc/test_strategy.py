"""AllReduceStrategy on real ranks, against one process training on the concatenated batch."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.multiproc import strategy_workers as sw
from tests.multiproc.harness import REPO, ranks

STEPS = 20
# fp32 wire: the ranks add the same float32 numbers as one process, in another order;
# 20 steps of float32 rounding stay below this (measured: about 1e-7).
FP32_TOL = 2e-6
# Ranks on one host send float32 whatever compression asks, unless this forces the half wire.
WIRE = {"DTRAIN_SHM_COMPRESSION": "1"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("bucket_mb", [0.01, 1e-6, 25])  # mixed; every parameter alone (reduced in place); one bucket
def test_parity_fp32(world, opt, bucket_mb):
    out = ranks(sw.parity, world, opt, None, False, STEPS, bucket_mb, timeout=240)
    for diff, unused_none, _, _, inplace in out:
        assert diff <= FP32_TOL, f"parameters differ from one process by {diff}"
        assert unused_none, "a parameter no rank used must keep grad None"
        if bucket_mb == 1e-6:
            assert inplace >= STEPS * 4, f"solo buckets must be reduced in .grad, but only {inplace} were"
        if bucket_mb == 25:
            assert inplace == 0
    assert len({o[0] for o in out}) == 1, "ranks ended with different parameters"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 3])
def test_large_gradient_reduced_in_place_at_default_bucket_size(world):
    out = ranks(sw.big_gradient_parity, world, STEPS, timeout=180)
    for diff, inplace, layout in out:
        assert diff <= FP32_TOL, f"parameters differ from one process by {diff}"
        # Linear(64, 4100)'s weight (1.05 MB) alone; the last layer's 41 K floats (164 KB) and the biases packed
        assert sorted(layout) == [1, 3], layout
        assert inplace == STEPS, f"the 1 MB gradient must be reduced in .grad every step, was {inplace}/{STEPS} times"
    assert len({o[0] for o in out}) == 1, "ranks ended with different parameters"


def wire_bound(world, unit, grads, lr=0.05, momentum=0.9):
    """The drift fp16/bf16 may cause, derived for SGD with momentum.

    The wire rounds each value at most `world` times (world-1 partial sums in the
    reduce-scatter, the result in the allgather), each by at most `unit` of the
    partial sum, whose size is at most the sum of the ranks' |gradients|; averaged,
    that is at most world*unit*max|g| per element per step. Momentum m sums past
    errors with weights below 1/(1-m), and the step is lr times that: after T steps
    the parameters move at most lr/(1-m) * sum_t world*unit*max|g_t| apart from the
    exact run. Doubled for the feedback of changed parameters into later gradients,
    which at lr=0.05 over 20 steps stays well under that factor.
    """
    return 2 * lr / (1 - momentum) * sum(world * unit * g for g in grads)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("compression,unit", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)])
@pytest.mark.parametrize("world", [2, 3])
def test_parity_half_wire(world, compression, unit):
    out = ranks(sw.parity, world, "sgd", compression, False, STEPS, env=WIRE, timeout=240)
    diff, unused_none, grads, redos, _ = out[0]
    bound = wire_bound(world, unit, grads)
    assert diff > 0, "half-precision wire gave exactly the float32 result: compression did not run"
    assert diff <= bound, f"{compression} drift {diff} exceeds the derived bound {bound}"
    assert redos == 0, f"steady gradients must keep their fp16 scale, but {redos} buckets were redone"
    assert unused_none
    assert len({o[0] for o in out}) == 1, "ranks ended with different parameters"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_error_feedback_shrinks_drift(compression):
    plain = ranks(sw.parity, 2, "sgd", compression, False, 40, env=WIRE, timeout=240)[0][0]
    fed = ranks(sw.parity, 2, "sgd", compression, True, 40, env=WIRE, timeout=240)[0][0]
    assert fed < plain / 4, f"error feedback did not shrink the {compression} drift: {fed} vs {plain} without"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 3])
def test_no_sync_equals_one_big_batch(world):
    for diff in ranks(sw.no_sync_accumulation, world, 3, timeout=150):
        assert diff <= 1e-6, f"accumulated gradients differ from one big batch by {diff}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("bucket_mb", [25, 1e-6])
def test_parameter_used_on_one_rank(world, bucket_mb):
    out = ranks(sw.partly_used, world, bucket_mb, timeout=100)
    for extra_grad, never_none, lin_grad in out:
        # rank 0's gradient of extra.weight is 2 (two rows of ones) per element; the others gave 0
        assert extra_grad[0] == pytest.approx([2.0 / world] * 4)
        assert never_none
        assert lin_grad[0] == pytest.approx([2.0] * 4)


@pytest.mark.timeout(120)
def test_rank_whose_backward_reaches_no_parameter():
    out = ranks(sw.no_grad_rank, 2, timeout=100)
    assert out[0] == out[1]
    torch.manual_seed(0)
    w0 = torch.nn.Linear(3, 1).weight.detach()
    assert out[0][0] == pytest.approx((w0 - 0.5)[0].tolist())  # grad 1 on rank 0, 0 on rank 1, averaged


@pytest.mark.timeout(300)
def test_resume_matches_uninterrupted(tmp_path):
    full = ranks(sw.train_with_checkpoint, 2, str(tmp_path / "a"), 20, 10, False, timeout=200)
    resumed = ranks(sw.train_with_checkpoint, 2, str(tmp_path / "a"), 20, 10, True, timeout=200)
    for (losses_full, params_full), (losses_res, params_res) in zip(full, resumed):
        assert losses_res == losses_full[10:], "the resumed loss curve departs from the uninterrupted one"
        for p, q in zip(params_full, params_res):
            assert torch.equal(p, q)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n_items", [1, 7, 12])
def test_sharding_equal_steps_and_metrics(world, n_items):
    out = ranks(sw.metrics_and_sharding, world, n_items, 2, timeout=100)
    steps = {o[1] for o in out}
    assert len(steps) == 1, f"ranks would run different step counts: {steps}"
    covered = set()
    for seen, _, m in out:
        covered.update(seen)
        assert m["rank"] == pytest.approx(sum(range(world)) / world)
        assert m["one"] == 1.0
    assert covered == set(range(n_items)), "some samples were given to no rank"


@pytest.mark.timeout(120)
def test_kill_during_save_leaves_last_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    env = dict(os.environ, FOLDER=str(folder), MIB="48", PYTHONPATH=REPO)
    for delay in (0.4, 0.9, 1.5):
        p = subprocess.Popen([sys.executable, "-m", "tests.multiproc.strategy_workers"], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
        first = p.stdout.readline()  # one checkpoint is complete
        assert first.strip(), "the saver died before finishing its first checkpoint"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        import dtrain
        state = dtrain.LocalStrategy().load(str(folder))
        model = torch.nn.Linear(1024, 48 * 256, bias=False)
        dtrain.LocalStrategy().load(str(folder), model=model)
        step = state["step"]
        assert step >= 1
        assert torch.all(model.weight == float(step)), "the checkpoint mixes two saves"
    dtrain.LocalStrategy().save(str(folder), model=model, step=0)
    assert sorted(os.listdir(folder)) == ["checkpoint.pt"], "temporary files of killed saves were left behind"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_fp16_scale_neither_overflows_nor_flushes(world):
    # step 0 learns the scale exactly; 1e6 overflows fp16 unscaled; 1e-9 is below fp16's smallest value
    factors = [1.0, 1.0, 1e6, 1e6, 1e-9, 1e-9, 3e4]
    out = ranks(sw.fp16_scale_range, world, factors, env=WIRE, timeout=100)
    errors, redos = out[0]
    for step, err in enumerate(errors):
        assert err <= world * 2.0 ** -11, f"step {step} (x{factors[step]}): relative error {err}"
    assert max(errors[1:]) > 0, "the fp16 wire was never used"
    # the jump up by 1e6 and by 3e4 overflow the old scale, the drop by 1e15 underflows it: each is
    # redone in float32 once, and the step after each is scaled right
    assert redos == 3
