"""Tensor-parallel mappings, layers and blocks on real ranks against the unsplit torch modules,
and the 2 x 2 hybrids (tensor x data, pipeline x data) against one process.

Tolerances: a split layer sums partial products in another order than the whole one, so
outputs and gradients agree within float32 rounding: 1e-5 on values of order 1-10 (observed
about 1e-6). Training runs compound that over steps of Adam: 1e-5 on parameters.
"""

import pytest

from tests.multiproc import pipeline_workers as pw
from tests.multiproc import tensor_workers as tw
from tests.multiproc.harness import ranks


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n,width", [(2, 1), (2, 6), (3, 7), (4, 5)])
def test_mappings_are_conjugate_pairs(n, width):
    """Widths below, equal to and not divisible by the rank count (width 1 on 2 ranks leaves
    rank 1 an empty slice)."""
    for r, got in enumerate(ranks(tw.mappings, n, width, timeout=180)):
        for name, diff in got.items():
            assert diff <= 1e-6, f"{name} on rank {r} of {n}: {diff}"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n,d,hidden,heads", [(1, 8, 12, 2), (2, 8, 12, 2), (3, 12, 10, 3), (4, 16, 36, 4)])
def test_mlp_and_attention_blocks_equal_the_unsplit_modules(n, d, hidden, heads):
    for r, got in enumerate(ranks(tw.blocks, n, d, hidden, heads, timeout=180)):
        for block in ("mlp", "attention"):
            out, in_grad, param_grad = got[block]
            assert out <= 1e-5 and in_grad <= 1e-5 and param_grad <= 1e-5, (block, r, got[block])


@pytest.mark.timeout(200)
@pytest.mark.parametrize("n,num", [(2, 11), (3, 10), (2, 2)])
def test_vocab_parallel_embedding_and_cross_entropy(n, num):
    for r, got in enumerate(ranks(tw.vocab, n, num, 5, timeout=180)):
        assert max(got["embedding"]) <= 1e-6, (r, got["embedding"])
        loss, grad, per = got["cross_entropy"]
        assert loss <= 1e-5 and grad <= 1e-6 and per <= 1e-5, (r, got["cross_entropy"])


@pytest.mark.timeout(300)
def test_tensor_x_data_parallel_equals_one_process(tmp_path):
    """4 ranks = 2 tensor-parallel x 2 data-parallel; each replica sees half of each batch. Its
    parameter slices equal one process's after 6 Adam steps, and a run resumed from per-rank
    shards ends where the straight run does."""
    for r, (worst, loss_diff, resume) in enumerate(ranks(tw.tensor_data_parallel, 4, str(tmp_path / "tp.pt"),
                                                         timeout=280)):
        assert worst <= 1e-5, f"rank {r}: parameters {worst} from one process"
        assert loss_diff <= 1e-5, f"rank {r}: losses {loss_diff} from one process"
        assert resume == 0.0, f"rank {r}: resumed run {resume} from the straight one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp-shard0-of-2.pt", "tp-shard1-of-2.pt"]


@pytest.mark.timeout(300)
def test_pipeline_x_data_parallel_equals_one_process():
    """4 ranks = 2 pipeline stages x 2 data-parallel replicas (micro-batches of 3 rows): the
    replicas reduce once per step, and the stages' weights equal one process's."""
    results = ranks(tw.pipeline_data_parallel, 4, timeout=280)
    ref, ref_losses = pw.reference("adam", 10, 12)
    for replica in (0, 1):
        merged = {}
        for stage in (0, 1):
            state, losses, reductions = results[replica * 2 + stage]
            merged.update(state)
            assert reductions == 10, f"rank {replica * 2 + stage} reduced {reductions} times in 10 steps"
            assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5
        assert sorted(merged) == sorted(ref)
        worst = max((merged[k] - ref[k]).abs().max().item() for k in ref)
        assert worst <= 1e-5, f"replica {replica}: {worst} from one process"
