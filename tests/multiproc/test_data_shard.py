"""TFRecordDataset sharded over real ranks: equal steps, disjoint shares, fresh global shuffles."""

import pytest

from dtrain import data
from tests.multiproc import data_workers
from tests.multiproc.harness import ranks

COUNTS = (10, 7, 13, 4)


def write(d, index):
    paths, k = [], 0
    for i, n in enumerate(COUNTS):
        p = str(d / f"part-{i}.tfrecord")
        with data.TFRecordWriter(p) as w:
            for _ in range(n):
                w.write({"id": k})
                k += 1
        if index:
            data.build_index(p)
        paths.append(p)
    return paths, k


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("index", [True, False], ids=["by-record", "by-file"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_rank_runs_the_same_steps(tmp_path, world, index, drop_last):
    paths, total = write(tmp_path, index)
    got = ranks(data_workers.shard_and_step, world, paths, drop_last, False, 1)
    steps = {r[0][0] for r in got}
    assert len(steps) == 1, f"ranks ran {[r[0][0] for r in got]} steps"
    shares = [r[0][1] for r in got]
    assert len({len(s) for s in shares}) == 1
    if index and drop_last:  # by record: contiguous, disjoint, the remainder left out
        assert sum(shares, []) == list(range(total // world * world))
    if not drop_last:  # padding repeats records but loses none
        assert set(sum(shares, [])) == set(range(total))


@pytest.mark.timeout(180)
def test_global_shuffle_gives_each_rank_new_records_each_epoch(tmp_path):
    paths, total = write(tmp_path, True)
    got = ranks(data_workers.shard_and_step, 2, paths, True, True, 2)
    for epoch in range(2):
        flat = got[0][epoch][1] + got[1][epoch][1]
        assert len(flat) == len(set(flat)) == total // 2 * 2
    assert got[0][0][1] != got[0][1][1]
