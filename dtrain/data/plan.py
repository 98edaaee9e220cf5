"""Which records of which files one rank reads in one epoch, and in what order.

A plan is a list of segments for the C++ pipeline: ranges of one file (seek to a
byte offset, pass over some records, take some), or, for a global shuffle, single
records by byte offset. Sharding is by record when every file has an index
(`<file>.idx`), by file otherwise; either way each rank gets the same number of
records, dropping the remainder or padding by wrapping around (as torch's
DistributedSampler pads), so every rank runs the same number of steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dtrain.errors import ConfigError

# (file, byte offset to seek to (plain files) or 0, records to pass over, records to take or -1 for all)
Range = Tuple[int, int, int, int]

_COUNTS: Dict[tuple, int] = {}  # (path, size, mtime_ns, compression, skip) -> records


@dataclass
class FileInfo:
    path: str
    size: int
    index: Optional[np.ndarray] = None  # [records, 2] int64: offset, frame length

    @property
    def count(self) -> Optional[int]:
        return None if self.index is None else len(self.index)


@dataclass
class Plan:
    ranges: List[Range] = field(default_factory=list)
    refs: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None  # file, offset, frame length
    records: Optional[int] = None  # records this rank reads in the epoch, when known
    by: str = "file"  # "file" or "record": how the shard was cut


def load_index(path: str, size: int, compressed: bool) -> Optional[np.ndarray]:
    """The entries of `<path>.idx` if it exists, checked against the file (ConfigError when
    the index cannot belong to it)."""
    idx = os.fspath(path) + ".idx"
    if not os.path.exists(idx):
        return None
    with open(idx, "rb") as f:
        text = f.read()
    try:
        arr = np.array(text.split(), dtype=np.int64).reshape(-1, 2) if text.strip() else np.zeros((0, 2), np.int64)
    except ValueError:
        raise ConfigError(f"{idx} is not an index ('offset length' per line); rebuild it with "
                          f"`dtrain-data index {path}`") from None
    if len(arr):
        ends = arr[:, 0] + arr[:, 1]
        if arr[0, 0] != 0 or np.any(arr[1:, 0] != ends[:-1]) or np.any(arr[:, 1] < 16):
            raise ConfigError(f"{idx} does not describe back-to-back records starting at byte 0; rebuild it "
                              f"with `dtrain-data index {path}`")
        if not compressed and ends[-1] != size:
            raise ConfigError(f"{idx} covers {int(ends[-1])} bytes but {path} has {size}: the index is stale; "
                              f"rebuild it with `dtrain-data index {path}`")
    elif not compressed and size != 0:
        raise ConfigError(f"{idx} lists no records but {path} has {size} bytes; rebuild it with "
                          f"`dtrain-data index {path}`")
    return arr


def count_records(path: str, compression: str, skip: bool) -> int:
    """Records in one file (read once per file version; cached)."""
    from dtrain import _C
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, compression, skip)
    if key not in _COUNTS:
        _COUNTS[key] = _C.data.count_records(path, compression, skip)
    return _COUNTS[key]


def record_counts(files: Sequence[FileInfo], compression: str, skip: bool) -> List[int]:
    """Records per file: from the index where there is one, else counted (and cached)."""
    return [f.count if f.count is not None else count_records(f.path, compression, skip) for f in files]


def _pieces(files: Sequence[FileInfo], cum: np.ndarray, start: int, n: int, seekable: bool) -> List[Range]:
    """Ranges covering global records [start, start + n) of the concatenated files, wrapping
    around at the end (padding)."""
    total = int(cum[-1])
    out: List[Range] = []
    while n > 0:
        a = start % total
        k = min(n, total - a)
        for i in range(len(files)):
            lo, hi = max(a, int(cum[i])), min(a + k, int(cum[i + 1]))
            if lo >= hi:
                continue
            local = lo - int(cum[i])
            if seekable and files[i].index is not None:
                out.append((i, int(files[i].index[local, 0]), 0, hi - lo))
            else:
                out.append((i, 0, local, hi - lo))
        start, n = a + k, n - k
    return out


def _per_rank(total: int, world: int, drop_last: bool) -> int:
    return total // world if drop_last else -(-total // world)


def make_plan(files: Sequence[FileInfo], compression: str, skip: bool, rank: int, world: int, drop_last: bool,
              global_shuffle: bool, seed: int, epoch: int) -> Plan:
    seekable = compression == ""
    indexed = all(f.index is not None for f in files)
    if global_shuffle:
        missing = [f.path for f in files if f.index is None]
        if missing:
            raise ConfigError(f"shuffle(global_=True) permutes records by their index, but {len(missing)} file(s) "
                              f"have none (first: {missing[0]}); run `dtrain-data index FILES` once")
        if not seekable:
            raise ConfigError("shuffle(global_=True) reads records at random offsets, which compressed files do not "
                              "allow; use a shuffle buffer (shuffle(buffer=N)) for compressed files")
        return _global_plan(files, rank, world, drop_last, seed, epoch)
    if world == 1:
        counts = [f.count for f in files]
        return Plan([(i, 0, 0, -1) for i in range(len(files))],
                    records=None if None in counts else sum(counts), by="file")
    if indexed:
        cum = np.concatenate([[0], np.cumsum([f.count for f in files])])
        total = int(cum[-1])
        per = _per_rank(total, world, drop_last)
        if total == 0 or per == 0:
            return Plan([], records=0, by="record")
        return Plan(_pieces(files, cum, rank * per, per, seekable), records=per, by="record")
    if len(files) < world:
        raise ConfigError(f"{len(files)} file(s) cannot be shared by file among {world} ranks: every rank needs at "
                          "least one. Write index files (`dtrain-data index FILES`) so the dataset shards by "
                          "record, or write more, smaller files")
    counts = record_counts(files, compression, skip)
    mine = list(range(rank, len(files), world))
    totals = [sum(counts[i] for i in range(r, len(files), world)) for r in range(world)]
    target = min(totals) if drop_last else max(totals)
    if target and totals[rank] == 0:
        raise ConfigError(f"rank {rank}'s files ({', '.join(files[i].path for i in mine)}) hold no records, so it "
                          "cannot pad to the other ranks' count; write index files to shard by record")
    ranges: List[Range] = []
    left = target
    while left > 0:  # a second round pads by wrapping around this rank's files
        for i in mine:
            take = min(counts[i], left)
            if take:
                ranges.append((i, 0, 0, take))
            left -= take
            if left == 0:
                break
    return Plan(ranges, records=target, by="file")


def permutation(total: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of all records, the same on every rank."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(total)


def _global_plan(files: Sequence[FileInfo], rank: int, world: int, drop_last: bool, seed: int, epoch: int) -> Plan:
    counts = np.array([f.count for f in files], dtype=np.int64)
    total = int(counts.sum())
    per = _per_rank(total, world, drop_last)
    if total == 0 or per == 0:
        return Plan([], records=0, by="record")
    perm = permutation(total, seed, epoch)
    if per * world > total:  # pad by wrapping around the permutation
        perm = np.resize(perm, per * world)
    ids = perm[rank * per:(rank + 1) * per]
    cum = np.concatenate([[0], np.cumsum(counts)])
    file_of = np.searchsorted(cum, ids, side="right") - 1
    flat = np.concatenate([f.index for f in files])
    return Plan([], refs=(file_of.astype(np.int64), flat[ids, 0].copy(), flat[ids, 1].copy()), records=per,
                by="record")


def seed_for(seed: int, epoch: int, stream: int) -> int:
    """A 64-bit seed for one epoch of one random stream (the shuffle buffer)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, stream]).generate_state(1, np.uint64)[0])
