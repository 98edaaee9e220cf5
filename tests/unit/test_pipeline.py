"""TFRecordDataset's pipeline: order, interleave, shuffles, shards, map, repeat, resume,
errors, on real files written by dtrain's writer (byte-identical to TensorFlow's, see
test_tfrecord.py). Every record carries its global id, so each test checks exactly
which records arrive in which order."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dtrain import data
from dtrain.data import plan as dplan
from dtrain.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = {"id": data.FixedLen((), "int64"), "vec": data.VarLen("float32")}
COUNTS = (10, 7, 13)  # odd sizes on purpose


def write_files(d, counts=COUNTS, index=True, compression=None, start=0):
    paths, k = [], start
    for i, n in enumerate(counts):
        p = os.path.join(d, f"part-{i}.tfrecord")
        with data.TFRecordWriter(p, compression=compression) as w:
            for _ in range(n):
                w.write({"id": k, "vec": [float(k)] * (k % 4)})
                k += 1
        if index:
            data.build_index(p, compression=compression)
        paths.append(p)
    return paths


@pytest.fixture
def files(tmp_path):
    return write_files(str(tmp_path))


@pytest.fixture
def plain(tmp_path):  # no index files
    return write_files(str(tmp_path), index=False)


def ids(ds):
    out = []
    for item in ds:
        v = item["id"]
        out += v.tolist() if v.dim() else [int(v)]
    return out


ALL = list(range(sum(COUNTS)))


# ------------------------------------------------------------------ order and batching
@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("batch", [None, 1, 3, 7, 64])
def test_file_order_for_any_thread_count_and_batch(files, workers, batch):
    ds = data.TFRecordDataset(files, SPEC, workers=workers)
    if batch:
        ds = ds.batch(batch)
    assert ids(ds) == ALL


@pytest.mark.parametrize("batch", [1, 4, 7, 30, 31])
def test_drop_remainder_and_len(files, batch):
    ds = data.TFRecordDataset(files, SPEC).batch(batch, drop_remainder=True)
    got = [b["id"].tolist() for b in ds]
    assert all(len(b) == batch for b in got)
    assert sum(got, []) == ALL[:len(ALL) // batch * batch]
    assert len(ds) == len(got)
    assert ds.stats()["dropped"] == len(ALL) % batch
    ds2 = data.TFRecordDataset(files, SPEC).batch(batch)
    assert len(ds2) == len(list(ds2)) == -(-len(ALL) // batch)


def test_varlen_batches_keep_lengths_and_values(files):
    b = next(iter(data.TFRecordDataset(files, SPEC).batch(8)))
    assert b["vec_lengths"].tolist() == [k % 4 for k in range(8)]
    for r, k in enumerate(range(8)):
        assert b["vec"][r, :k % 4].tolist() == [float(k)] * (k % 4)
        assert not b["vec"][r, k % 4:].any()


def test_raw_records_batched_and_not(files):
    raw = list(data.TFRecordDataset(files))
    assert len(raw) == len(ALL) and all(isinstance(r, bytes) for r in raw)
    batches = list(data.TFRecordDataset(files).batch(8))
    assert [len(b) for b in batches] == [8, 8, 8, 6] and sum(batches, []) == raw


def test_an_empty_file_reads_as_nothing_under_skip(tmp_path):
    paths = write_files(str(tmp_path), counts=(3, 4), index=False)
    empty = str(tmp_path / "empty.tfrecord")
    open(empty, "wb").close()
    ds = data.TFRecordDataset([paths[0], empty, paths[1]], SPEC, on_error="skip")
    assert ids(ds) == list(range(7))


# ------------------------------------------------------------------ interleave
def reference_interleave(seqs, cycle, block):
    """tf.data's interleave order: `cycle` slots take turns, `block` records a turn. A slot
    found empty on its turn opens the next input and serves the turn from it; an input
    found exhausted on its turn leaves its slot empty and the turn passes on."""
    pending = [list(s) for s in seqs]
    slots = [None] * min(cycle, len(seqs))
    out, i, turn = [], 0, 0
    while pending or any(s is not None for s in slots):
        if slots[i] is None:
            if not pending:
                i, turn = (i + 1) % len(slots), 0
                continue
            slots[i] = pending.pop(0)
        if not slots[i]:
            slots[i] = None
            i, turn = (i + 1) % len(slots), 0
            continue
        out.append(slots[i].pop(0))
        turn += 1
        if turn == block:
            i, turn = (i + 1) % len(slots), 0
    return out


# What TensorFlow 2.21 gives for Dataset.range(3).interleave(ranges of 10, 7 and 13
# numbers, cycle_length, block_length, deterministic=True), printed once and kept here.
TF_INTERLEAVE = {
    (2, 1): [0, 10, 1, 11, 2, 12, 3, 13, 4, 14, 5, 15, 6, 16, 7, 8, 17, 9] + list(range(18, 30)),
    (2, 3): [0, 1, 2, 10, 11, 12, 3, 4, 5, 13, 14, 15, 6, 7, 8, 16, 9] + list(range(17, 30)),
    (5, 2): [0, 1, 10, 11, 17, 18, 2, 3, 12, 13, 19, 20, 4, 5, 14, 15, 21, 22, 6, 7, 16, 23, 24, 8, 9]
    + list(range(25, 30)),
    (3, 1): [0, 10, 17, 1, 11, 18, 2, 12, 19, 3, 13, 20, 4, 14, 21, 5, 15, 22, 6, 16, 23, 7, 24, 8, 25, 9]
    + list(range(26, 30)),
}


def test_reference_interleave_is_tensorflows():
    seqs = [list(range(0, 10)), list(range(10, 17)), list(range(17, 30))]
    for (cycle, block), want in TF_INTERLEAVE.items():
        assert reference_interleave(seqs, cycle, block) == want


@pytest.mark.parametrize("cycle,block", [(1, 1), (2, 1), (3, 1), (2, 3), (5, 2)])
@pytest.mark.parametrize("workers", [1, 3])
def test_interleave_matches_tf_data_order(files, cycle, block, workers):
    seqs, k = [], 0
    for n in COUNTS:
        seqs.append(list(range(k, k + n)))
        k += n
    ds = data.TFRecordDataset(files, SPEC, workers=workers).interleave(cycle, block).batch(4)
    assert ids(ds) == reference_interleave(seqs, cycle, block)


# ------------------------------------------------------------------ shuffles
def test_shuffle_buffer_is_seeded_and_thread_count_independent(files):
    orders = [ids(data.TFRecordDataset(files, SPEC, workers=w).shuffle(8, seed=3).batch(5)) for w in (1, 2, 4)]
    assert orders[0] == orders[1] == orders[2]
    assert sorted(orders[0]) == ALL and orders[0] != ALL
    assert ids(data.TFRecordDataset(files, SPEC).shuffle(8, seed=4)) != orders[0]
    assert ids(data.TFRecordDataset(files, SPEC).shuffle(1, seed=3)) == ALL  # a buffer of one cannot reorder


def test_each_iteration_is_the_next_epoch_with_a_new_order(files):
    ds = data.TFRecordDataset(files, SPEC).shuffle(16, seed=0)
    e0, e1 = ids(ds), ids(ds)
    assert sorted(e0) == sorted(e1) == ALL and e0 != e1
    ds.set_epoch(0)
    assert ids(ds) == e0
    again = data.TFRecordDataset(files, SPEC).shuffle(16, seed=0)
    again.set_epoch(1)
    assert ids(again) == e1


def test_global_shuffle_is_the_seeded_permutation(files):
    ds = data.TFRecordDataset(files, SPEC, workers=2).shuffle(global_=True, seed=5).batch(4)
    assert ids(ds) == dplan.permutation(len(ALL), 5, 0).tolist()
    assert ids(ds) == dplan.permutation(len(ALL), 5, 1).tolist()  # the next epoch
    spelled = data.TFRecordDataset(files, SPEC).shuffle(**{"global": True, "seed": 5})
    assert ids(spelled) == dplan.permutation(len(ALL), 5, 0).tolist()


def test_global_shuffle_with_a_buffer_on_top_stays_deterministic(files):
    a = ids(data.TFRecordDataset(files, SPEC, workers=1).shuffle(4, seed=1, global_=True))
    b = ids(data.TFRecordDataset(files, SPEC, workers=3).shuffle(4, seed=1, global_=True))
    assert a == b and sorted(a) == ALL and a != dplan.permutation(len(ALL), 1, 0).tolist()


def test_global_shuffle_needs_index_and_plain_files(plain, tmp_path):
    with pytest.raises(ConfigError, match="dtrain-data index"):
        list(data.TFRecordDataset(plain, SPEC).shuffle(global_=True))
    os.makedirs(tmp_path / "gz")
    gz = write_files(str(tmp_path / "gz"), compression="gzip")
    with pytest.raises(ConfigError, match="compressed"):
        list(data.TFRecordDataset(gz, SPEC, compression="gzip").shuffle(global_=True))


def test_shuffle_arguments_are_checked(files):
    ds = data.TFRecordDataset(files, SPEC)
    with pytest.raises(ConfigError, match="buffer=N"):
        ds.shuffle()
    with pytest.raises(ConfigError, match="buffer must be a positive int"):
        ds.shuffle(0)
    with pytest.raises(ConfigError, match="unexpected"):
        ds.shuffle(4, sed=1)


# ------------------------------------------------------------------ shards
@pytest.mark.parametrize("world", [1, 2, 3, 4, 31, 40])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_by_record_gives_equal_disjoint_shares(files, world, drop_last):
    parts = [ids(data.TFRecordDataset(files, SPEC).shard(r, world, drop_last=drop_last)) for r in range(world)]
    n = len(ALL)
    per = n // world if drop_last else -(-n // world)
    assert all(len(p) == per for p in parts)
    flat = sum(parts, [])
    if drop_last:
        assert flat == ALL[:per * world]  # contiguous pieces, remainder left out
    else:
        assert flat == (ALL * 2)[:per * world]  # padding wraps around to the start
    assert len(data.TFRecordDataset(files, SPEC).shard(0, world, drop_last=drop_last).batch(4)) == -(-per // 4)


def test_shard_by_file_without_index(plain):
    # rank 0 has files 0 and 2 (10 + 13 records), rank 1 file 1 (7)
    pad = [ids(data.TFRecordDataset(plain, SPEC).shard(r, 2)) for r in range(2)]
    assert pad[0] == list(range(10)) + list(range(17, 30))
    assert pad[1] == list(range(10, 17)) * 3 + list(range(10, 12))  # wraps its own file to 23
    drop = [ids(data.TFRecordDataset(plain, SPEC).shard(r, 2, drop_last=True)) for r in range(2)]
    assert drop == [list(range(7)), list(range(10, 17))]
    with pytest.raises(ConfigError, match="3 file.*4 ranks.*dtrain-data index"):
        data.TFRecordDataset(plain, SPEC).shard(0, 4).records_per_epoch()


@pytest.mark.parametrize("world", [2, 3])
def test_global_shuffle_shards_are_disjoint_and_change_each_epoch(files, world):
    def parts(epoch):
        out = []
        for r in range(world):
            ds = data.TFRecordDataset(files, SPEC).shard(r, world, drop_last=True).shuffle(global_=True, seed=2)
            ds.set_epoch(epoch)
            out.append(ids(ds))
        return out
    e0, e1 = parts(0), parts(1)
    for p in (e0, e1):
        flat = sum(p, [])
        assert len(flat) == len(set(flat)) == len(ALL) // world * world
    assert e0[0] != e1[0]


def test_shard_arguments_are_checked(files):
    ds = data.TFRecordDataset(files, SPEC)
    with pytest.raises(ConfigError, match="0 <= rank < world_size"):
        ds.shard(2, 2)
    with pytest.raises(ConfigError, match="sharded already"):
        ds.shard(0, 2).shard(1, 2)


def test_compressed_files_shard_by_record_with_an_index(tmp_path):
    gz = write_files(str(tmp_path), compression="gzip")
    parts = [ids(data.TFRecordDataset(gz, SPEC, compression="gzip").shard(r, 3)) for r in range(3)]
    assert sum(parts, []) == ALL[:30] and [len(p) for p in parts] == [10, 10, 10]


# ------------------------------------------------------------------ map, repeat, prefetch
def test_map_per_record_on_threads_keeps_order(files):
    def fn(rec):
        rec["double"] = rec["id"] * 2
        return rec
    ds = data.TFRecordDataset(files, SPEC).map(fn, workers=3).batch(6)
    out = list(ds)
    assert torch.cat([b["double"] for b in out]).tolist() == [2 * k for k in ALL]
    assert out[0]["vec_lengths"].tolist() == [k % 4 for k in range(6)]  # VarLen re-padded with lengths
    state = ds.state_dict()
    assert (state["epoch"], state["position"]) == (1, 0)  # a finished epoch: the next one is due


def test_state_counts_what_the_loop_got_not_what_was_prefetched(files):
    ds = data.TFRecordDataset(files, SPEC).map(lambda r: r, workers=2).batch(4).prefetch(6)
    it = iter(ds)
    for k in range(1, 8):
        next(it)
        assert ds.state_dict()["position"] == 4 * k and ds.state_dict()["epoch"] == 0
    next(it)  # the last, short batch
    assert ds.state_dict()["position"] == 30
    with pytest.raises(StopIteration):
        next(it)
    assert (ds.state_dict()["epoch"], ds.state_dict()["position"]) == (1, 0)


def test_map_after_batch_sees_batches(files):
    sizes = []
    ds = data.TFRecordDataset(files, SPEC).batch(8).map(lambda b: sizes.append(len(b["id"])) or b["id"].sum())
    assert [int(x) for x in ds] == [sum(ALL[i:i + 8]) for i in range(0, len(ALL), 8)]
    assert sizes == [8, 8, 8, 6]


def test_map_errors_reach_the_loop(files):
    def bad(rec):
        raise ValueError("broken map")
    with pytest.raises(ValueError, match="broken map"):
        list(data.TFRecordDataset(files, SPEC).map(bad, workers=2).batch(4).prefetch(2, pin_memory=False))


def test_repeat_runs_epochs_with_fresh_shuffles(files):
    ds = data.TFRecordDataset(files, SPEC).shuffle(10, seed=1).repeat(3).batch(10)
    got = ids(ds)
    assert len(got) == 3 * len(ALL)
    epochs = [got[i * 30:(i + 1) * 30] for i in range(3)]
    assert all(sorted(e) == ALL for e in epochs) and epochs[0] != epochs[1]
    forever = iter(data.TFRecordDataset(files, SPEC).repeat().batch(30))
    assert [next(forever)["id"].tolist() for _ in range(5)] == [ALL] * 5


def test_prefetch_checks_its_device(files):
    ds = data.TFRecordDataset(files, SPEC)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs CUDA"):
            ds.prefetch(2, device="cuda")
        with pytest.warns(UserWarning, match="pin_memory"):
            ds.prefetch(2, pin_memory=True)
    assert ids(ds.batch(4).prefetch(3, device="cpu")) == ALL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetch_to_cuda_copies_on_a_side_stream(files):
    ds = data.TFRecordDataset(files, SPEC).batch(8).prefetch(2, pin_memory=True, device="cuda")
    got = list(ds)
    assert all(b["id"].is_cuda for b in got)
    assert torch.cat([b["id"].cpu() for b in got]).tolist() == ALL


def test_dataloader_workers_are_refused_with_a_fix(files):
    loader = torch.utils.data.DataLoader(data.TFRecordDataset(files, SPEC), batch_size=None, num_workers=1)
    with pytest.raises(Exception, match="num_workers=0"):
        list(loader)
    direct = torch.utils.data.DataLoader(data.TFRecordDataset(files, SPEC).batch(5), batch_size=None)
    assert torch.cat([b["id"] for b in direct]).tolist() == ALL


# ------------------------------------------------------------------ resume
def build(files, kind):
    ds = data.TFRecordDataset(files, SPEC, workers=2)
    if kind == "shuffle":
        ds = ds.shuffle(6, seed=9)
    elif kind == "global":
        ds = ds.shuffle(global_=True, seed=9)
    elif kind == "shard":
        ds = ds.shard(1, 3).interleave(2)
    return ds.batch(4)


@pytest.mark.parametrize("kind", ["plain", "shuffle", "global", "shard"])
@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_resume_mid_epoch_neither_replays_nor_skips(files, kind, stop_after):
    full = ids(build(files, kind))
    ds = build(files, kind)
    seen = []
    it = iter(ds)
    for _ in range(stop_after):
        seen += next(it)["id"].tolist()
    state = json.loads(json.dumps(ds.state_dict()))  # as a checkpoint stores it
    it.close()
    again = build(files, kind)
    again.load_state_dict(state)
    rest = ids(again)
    assert seen + rest == full
    assert again.stats()["resumed"] == len(seen)


def test_resume_across_epochs_with_repeat(files):
    ds = data.TFRecordDataset(files, SPEC).shuffle(5, seed=2).repeat(2).batch(10)
    full = ids(ds)
    part = data.TFRecordDataset(files, SPEC).shuffle(5, seed=2).repeat(2).batch(10)
    it = iter(part)
    seen = [next(it)["id"].tolist() for _ in range(4)]  # the second epoch's first batch
    state = part.state_dict()
    assert state["epoch"] == 1 and state["position"] == 10
    it.close()
    again = data.TFRecordDataset(files, SPEC).shuffle(5, seed=2).repeat(1).batch(10)
    again.load_state_dict(state)
    assert sum(seen, []) + ids(again) == full


def test_resume_after_restarting_the_process(files, tmp_path):
    """One process reads part of an epoch and saves the state; a fresh process resumes."""
    prog = f"""
import json, sys
sys.path.insert(0, {REPO!r})
from dtrain import data
spec = {{"id": data.FixedLen((), "int64")}}
ds = data.TFRecordDataset({files!r}, spec).shuffle(7, seed=1).batch(3)
if sys.argv[1] == "first":
    it = iter(ds)
    got = [next(it)["id"].tolist() for _ in range(4)]
    json.dump({{"got": sum(got, []), "state": ds.state_dict()}}, open(sys.argv[2], "w"))
else:
    saved = json.load(open(sys.argv[2]))
    ds.load_state_dict(saved["state"])
    rest = [x for b in ds for x in b["id"].tolist()]
    full = [x for b in data.TFRecordDataset({files!r}, spec).shuffle(7, seed=1).batch(3) for x in b["id"].tolist()]
    assert saved["got"] + rest == full, (saved["got"], rest, full)
    print("resumed", len(saved["got"]), len(rest))
"""
    state = str(tmp_path / "state.json")
    for step in ("first", "second"):
        p = subprocess.run([sys.executable, "-c", prog, step, state], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    assert "resumed 12 18" in p.stdout


def test_state_from_another_dataset_is_refused(files):
    state = data.TFRecordDataset(files, SPEC).batch(4).state_dict()
    with pytest.raises(ConfigError, match="batch_size"):
        data.TFRecordDataset(files, SPEC).batch(5).load_state_dict(state)
    with pytest.raises(ConfigError, match="shard"):
        data.TFRecordDataset(files, SPEC).shard(0, 2).batch(4).load_state_dict(state)
    with pytest.raises(ConfigError, match="not a TFRecordDataset state"):
        data.TFRecordDataset(files, SPEC).load_state_dict({"epoch": 1})


# ------------------------------------------------------------------ errors in the threaded pipeline
def damage(path, offset, byte=0xFF):
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ byte]))


@pytest.mark.parametrize("workers", [1, 3])
def test_a_damaged_payload_stops_at_its_place_in_order(files, workers):
    idx = data.read_index(files[1] + ".idx")
    off = idx[3][0]
    damage(files[1], off + 14)  # inside the 4th record's payload
    ds = data.TFRecordDataset(files, SPEC, workers=workers).batch(2)
    got = []
    with pytest.raises(DataError, match=rf"part-1.tfrecord.*byte offset {off}\b.*data CRC"):
        for b in ds:
            got += b["id"].tolist()
    assert got == ALL[:13]  # every record before the bad one (id 13), in order
    skipped = data.TFRecordDataset(files, SPEC, workers=workers, on_error="skip").batch(2)
    assert ids(skipped) == ALL[:13] + ALL[14:]
    assert skipped.stats()["bad_records"] == 1 and f"offset {off}" in skipped.problems()[0]


def test_a_damaged_record_read_through_the_index(files):
    idx = data.read_index(files[0] + ".idx")
    damage(files[0], idx[5][0] + 20)
    ds = data.TFRecordDataset(files, SPEC).shuffle(global_=True, seed=0)
    with pytest.raises(DataError, match=rf"byte offset {idx[5][0]}\b.*data CRC"):
        list(ds)
    ok = data.TFRecordDataset(files, SPEC, on_error="skip").shuffle(global_=True, seed=0)
    assert sorted(ids(ok)) == [k for k in ALL if k != 5] and ok.stats()["bad_records"] == 1


def test_a_stale_index_is_named(files):
    with open(files[2], "ab") as f:
        f.write(b"\0" * 5)
    with pytest.raises(ConfigError, match="stale.*dtrain-data index"):
        list(data.TFRecordDataset(files, SPEC).shard(0, 2))


def test_a_parse_error_names_record_and_feature(files):
    spec = {"id": data.FixedLen((2,), "int64")}
    with pytest.raises(DataError, match=r"part-0.tfrecord: record at byte offset 0, feature 'id'"):
        list(data.TFRecordDataset(files, spec, workers=2).batch(4))


def test_leaving_a_loop_early_stops_the_threads(files):
    def threads():
        return len(os.listdir("/proc/self/task"))
    before = threads()
    for _ in range(5):
        for _b in data.TFRecordDataset(files, SPEC, workers=4).batch(2):
            break
    import gc
    gc.collect()
    assert threads() <= before + 1  # the pipelines' 5 threads each are gone


def test_memory_stays_bounded_by_the_buffers(tmp_path):
    """A pipeline far behind its consumer holds a bounded number of batches."""
    paths = write_files(str(tmp_path), counts=(4000,), index=False)
    ds = data.TFRecordDataset(paths, SPEC, workers=2).batch(10).prefetch(2)
    it = iter(ds)
    next(it)
    import time
    time.sleep(0.3)  # let the threads run ahead as far as they may
    st = ds.stats()  # the live pipeline's counters
    it.close()
    # parsed so far: the batch taken, plus at most prefetch + workers waiting
    assert st["batches"] == 1 and 10 <= st["records"] <= (1 + 2 + 2) * 10


def test_stats_report_thread_times(files):
    ds = data.TFRecordDataset(files, SPEC).batch(4)
    list(ds)
    st = ds.stats()
    assert st["records"] == len(ALL) and st["batches"] == 8
    assert st["read_s"] > 0 and st["parse_s"] > 0 and st["wait_s"] >= 0


def test_distribute_shards_a_tfrecord_dataset(files):
    import dtrain
    s = dtrain.LocalStrategy()
    ds = s.distribute(data.TFRecordDataset(files, SPEC).batch(4))
    assert ids(ds) == ALL and ds._shard == (0, 1, False)
    with pytest.raises(ConfigError, match="sharded for rank 1 of 2"):
        s.distribute(data.TFRecordDataset(files, SPEC).shard(1, 2))


# ------------------------------------------------------------------ dtrain-data
def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "dtrain.data.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def test_cli_index_writes_what_build_index_reads(plain, tmp_path):
    p = cli("index", str(tmp_path / "*.tfrecord"))
    assert p.returncode == 0, p.stderr
    for f, n in zip(plain, COUNTS):
        assert len(data.read_index(f + ".idx")) == n
        assert f"{n}" in p.stdout
    assert ids(data.TFRecordDataset(plain, SPEC).shard(0, 2, drop_last=True)) == ALL[:15]  # by record now


def test_cli_check_lists_every_bad_record_and_fails(plain):
    idx = [o for o, _ in data.build_index(plain[2])]
    os.remove(plain[2] + ".idx")
    damage(plain[2], idx[2] + 14)
    damage(plain[2], idx[7] + 14)
    p = cli("check", *plain)
    assert p.returncode == 1
    assert f"byte offset {idx[2]}:" in p.stdout and f"byte offset {idx[7]}:" in p.stdout
    assert "2 bad record(s)" in p.stdout
    assert cli("check", plain[0]).returncode == 0


def test_cli_stats_suggests_a_spec_that_reads_the_files(plain):
    p = cli("stats", *plain)
    assert p.returncode == 0, p.stderr
    assert f"{len(ALL)} records" in p.stdout
    spec_src = p.stdout.split("A spec that reads them:\n", 1)[1]
    scope = {"FixedLen": data.FixedLen, "VarLen": data.VarLen}
    exec(spec_src, scope)
    assert scope["spec"] == {"id": data.FixedLen((), "int64"), "vec": data.VarLen("float32")}
    assert ids(data.TFRecordDataset(plain, scope["spec"])) == ALL


def test_cli_names_a_missing_file():
    p = cli("check", "/nonexistent/x.tfrecord")
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_batch_maps_run_on_threads_in_order(files):
    import threading
    import time
    names = set()

    def slow(b):
        names.add(threading.current_thread().name)
        time.sleep(0.01 * (int(b["id"][0]) % 3))  # later batches may finish first
        return b["id"].tolist()
    ds = data.TFRecordDataset(files, SPEC).batch(3).map(slow, workers=3)
    assert sum(list(ds), []) == ALL
    assert len(names) > 1 and all(n.startswith("dtrain-map") for n in names)


def test_skipped_records_do_not_cost_a_rank_a_step(files):
    """30 records over 2 ranks, batches of 5: 3 each. Rank 0 loses a record to damage and
    would run 2 batches under drop_remainder; it repeats its last batch instead."""
    idx = data.read_index(files[0] + ".idx")
    damage(files[0], idx[4][0] + 14)
    counts = []
    for rank in range(2):
        ds = data.TFRecordDataset(files, SPEC, on_error="skip").shard(rank, 2).batch(5, drop_remainder=True)
        got = [b["id"].tolist() for b in ds]
        counts.append(len(got))
        if rank == 0:
            assert ds.stats()["bad_records"] == 1 and ds.stats()["padded_batches"] == 1
            assert got[-1] == got[-2] and 4 not in sum(got, [])
    assert counts == [3, 3]
