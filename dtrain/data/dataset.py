"""TFRecordDataset: TFRecord files to dicts of torch tensors, read and parsed in C++.

    ds = (TFRecordDataset("train-*.tfrecord", spec)
            .shard(rank, world_size)          # by record with index files, by file without
            .shuffle(buffer=10_000, seed=0)   # or shuffle(global_=True) over the index
            .batch(256, drop_remainder=True)
            .prefetch(4))
    for batch in ds:        # {"image": uint8 [256, 3072], "label": int64 [256], ...}
        ...

Reading, CRC checks, decompression, interleaving, the shuffle buffer and Example
parsing run on C++ threads without the GIL, straight into the batch's column
buffers, which become tensors without a copy. The order depends only on the seed and
the epoch, never on the number of threads. Each transformation returns a new
dataset; iterating one runs an epoch, and the next iteration runs the next epoch
(set_epoch() picks one, as with DistributedSampler).
"""

from __future__ import annotations

import collections
import copy
import glob
import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from dtrain.data import plan as _plan
from dtrain.data.spec import TORCH, FixedLen, VarLen, to_schema
from dtrain.data.tfrecord import _compression, _skip
from dtrain.errors import ConfigError, DataError

_UNBATCHED_CHUNK = 256  # records parsed per C++ batch when yielding single records
_EPOCH_END = object()  # marks an epoch's end in the item stream
_STATE_VERSION = 1


def expand_files(files_or_glob: Union[str, Sequence[str]]) -> List[str]:
    """Sorted paths for a glob, a path, or a list of either (ConfigError when nothing matches)."""
    items = [files_or_glob] if isinstance(files_or_glob, (str, os.PathLike)) else list(files_or_glob)
    out: List[str] = []
    for item in items:
        item = os.fspath(item)
        if any(c in item for c in "*?["):
            hits = sorted(glob.glob(item))
            if not hits:
                raise ConfigError(f"no files match {item!r}")
            out += hits
        else:
            if not os.path.exists(item):
                raise ConfigError(f"TFRecord file {item!r} does not exist")
            out.append(item)
    if not out:
        raise ConfigError("TFRecordDataset needs at least one file")
    return [f for f in out if not f.endswith(".idx")]


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


class TFRecordDataset(torch.utils.data.IterableDataset):
    """Records of TFRecord files, parsed by `spec` (None: the raw record bytes).

    Args:
        files_or_glob: a path, a glob, or a list of them (read in sorted order).
        spec: {name: FixedLen(...) | VarLen(...)}; see dtrain.data.spec.
        compression: None, "gzip" or "zlib" (the whole file).
        on_error: "raise" (DataError naming file, byte offset and feature) or "skip"
            (the bad record alone is left out and counted in stats()).
        sequence: records are tf.train.SequenceExample; the spec reads their context.
        verify_crc: check both CRCs of every record (on by default).
        buffer_bytes: read buffer of each open file.
        workers: C++ threads reading and parsing (default: the cores this process may
            use, at most 8); one more thread orders and shuffles.
    """

    def __init__(self, files_or_glob, spec: Optional[Dict[str, Any]] = None, compression: Optional[str] = None,
                 on_error: str = "raise", sequence: bool = False, verify_crc: bool = True,
                 buffer_bytes: int = 1 << 20, workers: Optional[int] = None):
        super().__init__()
        self.files = expand_files(files_or_glob)
        self.spec = spec
        self.compression = _compression(compression)
        self.on_error = on_error
        self._skip = _skip(on_error)
        self.sequence = bool(sequence)
        self.verify_crc = bool(verify_crc)
        if not (isinstance(buffer_bytes, int) and buffer_bytes >= 4096):
            raise ConfigError(f"buffer_bytes must be an int of at least 4096, got {buffer_bytes!r}")
        self.buffer_bytes = buffer_bytes
        self.workers = _default_workers() if workers is None else _positive("workers", workers)
        self._schema = to_schema(spec, self.sequence) if spec is not None else None
        self._check_files()
        # Transformations (see the methods of the same names).
        self._shard: Optional[Tuple[int, int, bool]] = None
        self._cycle, self._block = 1, 1
        self._shuffle_buffer, self._seed, self._global_shuffle = 0, 0, False
        self._maps: List[Tuple[Callable, int, bool]] = []  # (fn, threads, on batches)
        self._batch_size: Optional[int] = None
        self._drop_remainder = False
        self._prefetch, self._pin_memory, self._device = 2, False, None
        self._repeat: Optional[int] = 1
        # Position: the epoch the next iteration runs and how many of its records were consumed.
        self._epoch, self._position = 0, 0
        self._stats: Dict[str, float] = {}
        self._problems: List[str] = []
        self._infos: Optional[List[_plan.FileInfo]] = None
        self._live = None  # the running epoch's C++ pipeline

    def _check_files(self) -> None:
        for f in self.files:
            if os.path.isdir(f):
                raise ConfigError(f"{f!r} is a directory; give TFRecord files or a glob such as '{f}/*.tfrecord'")
            if os.path.getsize(f) == 0 and not self._skip:
                raise DataError(f"{f}: the file is empty (0 bytes), so it holds no records; remove it from the "
                                "list, or pass on_error='skip' to read empty files as holding nothing")

    # ---------------------------------------------------------------- transformations
    def _derive(self) -> "TFRecordDataset":
        new = copy.copy(self)
        new._maps = list(self._maps)
        new._stats, new._problems, new._live = {}, [], None
        return new

    def shard(self, rank: Optional[int] = None, world_size: Optional[int] = None,
              drop_last: bool = False) -> "TFRecordDataset":
        """This rank's share of the records: by record when every file has an index
        (`dtrain-data index`), by file otherwise. Every rank gets the same number of
        records: drop_last=False pads by wrapping around (as DistributedSampler does),
        True leaves the remainder out. rank/world_size default to dtrain's."""
        if rank is None or world_size is None:
            import dtrain
            if not dtrain.is_initialized():
                raise ConfigError("shard() without rank and world_size needs dtrain.init() first; or pass "
                                  "shard(rank, world_size)")
            rank = dtrain.rank() if rank is None else rank
            world_size = dtrain.world_size() if world_size is None else world_size
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ConfigError(f"shard needs 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if self._shard is not None:
            raise ConfigError(f"this dataset is sharded already (rank {self._shard[0]} of {self._shard[1]})")
        new = self._derive()
        new._shard = (rank, world_size, bool(drop_last))
        return new

    def interleave(self, cycle: int = 4, block: int = 1) -> "TFRecordDataset":
        """Reads `cycle` files (or shard pieces) at once, taking `block` records from each in
        turn; when one ends the next file takes its place (tf.data's interleave order)."""
        new = self._derive()
        new._cycle, new._block = _positive("cycle", cycle), _positive("block", block)
        return new

    def shuffle(self, buffer: Optional[int] = None, seed: int = 0, global_: bool = False,
                **kwargs) -> "TFRecordDataset":
        """A seeded shuffle, different every epoch and the same for any thread count.

        buffer=N keeps N records and emits a random one as each new one arrives (tf.data's
        shuffle). global_=True (also spelled ``**{"global": True}``) permutes all records
        through their index before sharding, so each rank sees a different random share
        every epoch; it needs index files and uncompressed files. Both may be combined.
        """
        if "global" in kwargs:
            global_ = kwargs.pop("global")
        if kwargs:
            raise ConfigError(f"shuffle() got unexpected arguments {sorted(kwargs)}; it takes buffer, seed, global_")
        if buffer is None and not global_:
            raise ConfigError("shuffle() needs buffer=N (records kept for shuffling) or global_=True")
        if buffer is not None:
            _positive("buffer", buffer)
        if not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {seed!r}")
        new = self._derive()
        new._shuffle_buffer = buffer or 0
        new._seed, new._global_shuffle = seed, bool(global_)
        return new

    def map(self, fn: Callable, workers: int = 1) -> "TFRecordDataset":
        """Applies fn to every record (before batch()) or every batch (after it), on
        `workers` threads; the order is kept. Torch ops and numba nogil functions run in
        parallel; pure Python functions serialize on the GIL."""
        if not callable(fn):
            raise ConfigError(f"map needs a callable, got {type(fn).__name__}")
        new = self._derive()
        new._maps.append((fn, _positive("workers", workers), self._batch_size is not None))
        return new

    def batch(self, batch_size: int, drop_remainder: bool = False) -> "TFRecordDataset":
        """Batches of `batch_size` records: FixedLen -> [B, *shape]; VarLen -> padded [B, L]
        plus `<name>_lengths` [B]; bytes -> lists. Batches do not span epochs."""
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if self._batch_size is not None:
            raise ConfigError("this dataset is batched already")
        new = self._derive()
        new._batch_size, new._drop_remainder = batch_size, bool(drop_remainder)
        return new

    def prefetch(self, n: int = 2, pin_memory: bool = False, device: Union[str, torch.device, None] = None
                 ) -> "TFRecordDataset":
        """Keeps `n` batches ready ahead of the loop. pin_memory puts them in page-locked
        memory; device copies them there on a side CUDA stream, ahead of use."""
        new = self._derive()
        new._prefetch = _positive("prefetch", n)
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"prefetch(device={device!r}) needs CUDA, which this torch build or machine does not "
                              "have; leave device=None to keep batches on the CPU")
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True needs CUDA, which is not available; batches stay in ordinary memory",
                          stacklevel=2)
            pin_memory = False
        new._pin_memory = bool(pin_memory)
        new._device = dev if dev is not None and dev.type != "cpu" else None
        return new

    def repeat(self, count: Optional[int] = None) -> "TFRecordDataset":
        """Runs `count` epochs per iteration (None: forever), reshuffled each epoch."""
        new = self._derive()
        new._repeat = None if count is None else _positive("count", count)
        return new

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration runs (it seeds the shuffles), from its start."""
        if not (isinstance(epoch, int) and epoch >= 0):
            raise ConfigError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch, self._position = epoch, 0

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Where iteration stands: the epoch and the records of it already handed out.
        load_state_dict() on a dataset built the same way resumes right after them."""
        shard = list(self._shard[:2]) if self._shard else None
        return {"version": _STATE_VERSION, "epoch": self._epoch, "position": self._position,
                "files": [os.path.basename(f) for f in self.files], "shard": shard, "seed": self._seed,
                "batch_size": self._batch_size}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ConfigError(f"not a TFRecordDataset state (version {_STATE_VERSION}): {state!r:.200}")
        mine = self.state_dict()
        for key in ("files", "shard", "seed", "batch_size"):
            if state.get(key) != mine[key]:
                raise ConfigError(f"the state was saved by a dataset with {key}={state.get(key)!r:.200}, this one has "
                                  f"{mine[key]!r:.200}; resume with the dataset built the same way")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    # ---------------------------------------------------------------- iteration
    def _file_infos(self) -> List[_plan.FileInfo]:
        if self._infos is None:
            infos = []
            for f in self.files:
                size = os.path.getsize(f)
                infos.append(_plan.FileInfo(f, size, _plan.load_index(f, size, self.compression != "")))
            self._infos = infos
        return self._infos

    def _make_plan(self, epoch: int) -> _plan.Plan:
        rank, world, drop = self._shard if self._shard else (0, 1, False)
        return _plan.make_plan(self._file_infos(), self.compression, self._skip, rank, world, drop,
                               self._global_shuffle, self._seed, epoch)

    def records_per_epoch(self) -> int:
        """Records this rank reads in an epoch (counts them once when there is no index)."""
        p = self._make_plan(self._epoch)
        if p.records is not None:
            return p.records
        counts = _plan.record_counts([self._file_infos()[r[0]] for r in p.ranges], self.compression, self._skip)
        return sum(counts)

    def __len__(self) -> int:
        """Batches (or records, unbatched) per epoch on this rank."""
        n = self.records_per_epoch()
        if self._batch_size is None:
            return n
        return n // self._batch_size if self._drop_remainder else -(-n // self._batch_size)

    def __iter__(self) -> Iterator[Any]:
        if torch.utils.data.get_worker_info() is not None:
            raise ConfigError("TFRecordDataset reads on its own C++ threads and would be read whole by every "
                              "DataLoader worker; iterate it directly, or use DataLoader(ds, batch_size=None, "
                              "num_workers=0)")
        self._stats, self._problems = {}, []
        items = self._epochs(self._epoch, self._position)
        pools: List[ThreadPoolExecutor] = []
        for fn, workers, on_batch in self._maps:
            if on_batch:  # batches map on their own threads, `workers` in flight, order kept
                pool = ThreadPoolExecutor(workers, thread_name_prefix="dtrain-map") if workers > 1 else None
                pools += [pool] if pool else []
                items = _map_batches(items, fn, pool, workers)
        if self._prefetch and (self._maps or self._pin_memory or self._device is not None):
            items = _background(items, self._prefetch, self._transfer)
        try:
            for item, n in items:
                if item is _EPOCH_END:  # the position moves on only as the loop gets there
                    self._epoch, self._position = n, 0
                    continue
                self._position += n
                yield item
        finally:
            items.close()
            for pool in pools:
                pool.shutdown(wait=False, cancel_futures=True)

    def _epochs(self, epoch: int, position: int) -> Iterator[Tuple[Any, int]]:
        done = 0
        while self._repeat is None or done < self._repeat:
            yield from self._one_epoch(epoch, position)
            epoch, position = epoch + 1, 0
            yield _EPOCH_END, epoch
            done += 1

    def _one_epoch(self, epoch: int, skip_records: int) -> Iterator[Tuple[Any, int]]:
        from dtrain import _C
        p = self._make_plan(epoch)
        batched = self._batch_size is not None
        per_record = [(fn, ThreadPoolExecutor(w, thread_name_prefix="dtrain-map") if w > 1 else None)
                      for fn, w, on_batch in self._maps if not on_batch]
        pipe = _C.data.Pipeline(
            self.files, self.compression, self._schema, p.ranges, p.refs,
            batch_size=self._batch_size if batched else _UNBATCHED_CHUNK,
            drop_remainder=self._drop_remainder and batched, skip=self._skip, verify=self.verify_crc,
            buffer_bytes=self.buffer_bytes, cycle=self._cycle, block=self._block,
            shuffle_buffer=self._shuffle_buffer, seed=_plan.seed_for(self._seed, epoch, 1),
            workers=self.workers, prefetch=self._prefetch, skip_records=skip_records)
        self._live = pipe
        batches, last = 0, None
        try:
            while True:
                b = pipe.next()
                if b is None:
                    yield from self._pad_steps(p, skip_records, batches, last)
                    break
                if self._schema is None:  # raw records: a list of bytes
                    rows, records = len(b), b
                    batch: Any = b
                else:
                    rows = b.rows
                    batch = columns(self.spec, b)
                    records = None
                if per_record or not batched:
                    if records is None:
                        records = list(_rows(self.spec, batch, rows))
                    for fn, pool in per_record:
                        records = _map_list(fn, records, pool)
                    if not batched:
                        for rec in records:
                            yield rec, 1
                        continue
                    batch = collate(records)
                batches, last = batches + 1, batch
                yield batch, rows
        finally:
            self._live = None
            st = pipe.stats()
            self._problems += list(pipe.problems())
            pipe.close()
            for _, pool in per_record:
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
            for k, v in st.items():
                self._stats[k] = self._stats.get(k, 0) + v

    def _pad_steps(self, p: _plan.Plan, skip_records: int, batches: int, last: Any) -> Iterator[Tuple[Any, int]]:
        """Under on_error="skip" a sharded rank that left bad records out may come up a batch
        short of the others, and would then wait alone in a collective. It repeats its last
        batch instead (counted in stats()["padded_batches"]; the position does not move)."""
        if not (self._skip and self._shard and self._shard[1] > 1 and self._batch_size and p.records is not None):
            return
        size = self._batch_size
        total = p.records // size if self._drop_remainder else -(-p.records // size)
        missing = total - skip_records // size - batches
        if missing > 0 and last is None:
            raise DataError(f"rank {self._shard[0]}'s share of the records held no good record, so it cannot run the "
                            f"{total} steps the other ranks run; see problems() for what was skipped")
        for _ in range(max(missing, 0)):
            self._stats["padded_batches"] = self._stats.get("padded_batches", 0) + 1
            yield last, 0

    def _transfer(self, item: Any) -> Any:
        """Pins and copies a batch to the prefetch device (on the background thread)."""
        if not (self._pin_memory or self._device is not None):
            return item
        return _to(item, self._pin_memory, self._device)

    def stats(self) -> Dict[str, float]:
        """Counters of the last (or current) iteration: records, bytes, bad_records (framing),
        bad_examples (parsing), batches, resumed (records passed over to resume), dropped
        (remainder), and seconds: wait_s (the loop waited for data), read_s, parse_s (thread time)."""
        out = dict(self._stats)
        live = self._live
        if live is not None:
            for k, v in live.stats().items():
                out[k] = out.get(k, 0) + v
        return out

    def problems(self) -> List[str]:
        """Messages of the records skipped in the last iteration (first 100 per epoch)."""
        return list(self._problems)


def _positive(name: str, v: Any) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ConfigError(f"{name} must be a positive int, got {v!r}")
    return v


def _map_batches(items: Iterator[Tuple[Any, int]], fn: Callable, pool: Optional[ThreadPoolExecutor],
                 depth: int) -> Iterator[Tuple[Any, int]]:
    """fn over the batches of `items`, up to `depth` at once on `pool`, in order."""
    pending: "collections.deque" = collections.deque()
    try:
        for item, n in items:
            if item is _EPOCH_END or pool is None:
                while pending:
                    f, k = pending.popleft()
                    yield f.result(), k
                yield (item if item is _EPOCH_END else fn(item)), n
                continue
            pending.append((pool.submit(fn, item), n))
            if len(pending) >= depth:
                f, k = pending.popleft()
                yield f.result(), k
        while pending:
            f, k = pending.popleft()
            yield f.result(), k
    finally:
        items.close()


def _map_list(fn: Callable, items: List[Any], pool: Optional[ThreadPoolExecutor]) -> List[Any]:
    if pool is None:
        return [fn(x) for x in items]
    return list(pool.map(fn, items))


def _rows(spec: Dict[str, Any], cols: Dict[str, Any], rows: int) -> Iterator[Dict[str, Any]]:
    """Single records of a parsed batch, each tensor with its own storage."""
    for r in range(rows):
        rec = {}
        for name, f in spec.items():
            v = cols[name][r]
            if isinstance(f, VarLen):
                n = int(cols[name + "_lengths"][r])
                v = v[:n] if f.dtype == "bytes" else v[:n].clone()
            elif isinstance(v, torch.Tensor):
                v = v.clone()  # not a view pinning the whole batch
            rec[name] = v
        yield rec


def collate(records: List[Any]) -> Any:
    """Stacks mapped records into a batch: equal-shape tensors stack; 1-D tensors of
    different lengths are padded with zeros, their lengths under `<name>_lengths`;
    anything else becomes a list (dicts and tuples are collated per key)."""
    first = records[0]
    if isinstance(first, dict):
        out: Dict[str, Any] = {}
        for k in first:
            vals = [r[k] for r in records]
            if (all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in vals)
                    and len({v.shape for v in vals}) > 1):
                out[k], out[k + "_lengths"] = _pad(vals)
            else:
                out[k] = collate(vals)
        return out
    if isinstance(first, (tuple, list)) and not isinstance(first, (str, bytes)):
        return type(first)(collate([r[i] for r in records]) for i in range(len(first)))
    if isinstance(first, torch.Tensor):
        if len({v.shape for v in records}) == 1:
            return torch.stack(records)
        if all(v.dim() == 1 for v in records):
            return _pad(records)[0]
        raise DataError(f"cannot batch tensors of shapes {sorted({tuple(v.shape) for v in records})[:4]}; make "
                        "the map function return equal shapes (or 1-D tensors, which are padded)")
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return torch.tensor(records)
    return list(records)


def _pad(vals: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(v) for v in vals], dtype=torch.int64)
    out = vals[0].new_zeros((len(vals), int(lengths.max())))
    for i, v in enumerate(vals):
        out[i, :len(v)] = v
    return out, lengths


def _to(item: Any, pin: bool, device: Optional[torch.device]) -> Any:
    if isinstance(item, torch.Tensor):
        t = item.pin_memory() if pin else item
        return t.to(device, non_blocking=True) if device is not None else t
    if isinstance(item, dict):
        return {k: _to(v, pin, device) for k, v in item.items()}
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
        return type(item)(_to(v, pin, device) for v in item)
    return item


_END = object()


def _background(items: Iterator[Tuple[Any, int]], depth: int, transfer: Callable[[Any], Any]
                ) -> Iterator[Tuple[Any, int]]:
    """Runs `items` (and `transfer` of each) on a thread, `depth` ahead. CUDA copies go on a
    side stream; the consumer's stream waits for each batch's copy before using it."""
    q: "queue.Queue" = queue.Queue(depth)
    stop = threading.Event()
    side = torch.cuda.Stream() if torch.cuda.is_available() else None

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item, n in items:
                if item is _EPOCH_END:
                    event = None
                elif side is not None:
                    with torch.cuda.stream(side):
                        item = transfer(item)
                        event = torch.cuda.Event()
                        event.record(side)
                else:
                    item, event = transfer(item), None
                if not put((item, n, event)):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)
        finally:
            items.close()

    t = threading.Thread(target=run, name="dtrain-prefetch", daemon=True)
    t.start()
    try:
        while True:
            got = q.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            item, n, event = got
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
                _record_stream(item)
            yield item, n
    finally:
        stop.set()
        t.join(timeout=10)


def _record_stream(item: Any) -> None:
    if isinstance(item, torch.Tensor) and item.is_cuda:
        item.record_stream(torch.cuda.current_stream())
    elif isinstance(item, dict):
        for v in item.values():
            _record_stream(v)
    elif isinstance(item, (list, tuple)):
        for v in item:
            _record_stream(v)


def columns(spec: Dict[str, Any], b) -> Dict[str, Any]:
    """A parsed C++ batch as a dict: FixedLen -> [rows, *shape] tensors (views of the batch's
    buffers); VarLen -> padded [rows, L] plus `<name>_lengths`; bytes -> lists."""
    out: Dict[str, Any] = {}
    rows = b.rows
    for i, (name, f) in enumerate(spec.items()):
        if f.dtype == "bytes":
            vals = b.bytes_values(i)
            out[name] = [v[0] for v in vals] if isinstance(f, FixedLen) and f.shape == () else vals
            if isinstance(f, VarLen):
                out[name + "_lengths"] = torch.tensor(b.lengths(i), dtype=torch.int64)
            continue
        dt = TORCH[f.dtype]
        if isinstance(f, FixedLen):
            out[name] = _tensor(b.data(i), dt, (rows,) + f.shape)
        else:
            out[name] = _tensor(b.padded(i), dt, (rows, b.max_len(i)))
            out[name + "_lengths"] = torch.tensor(b.lengths(i), dtype=torch.int64)
    return out


def _tensor(view, dtype: torch.dtype, shape) -> torch.Tensor:
    if len(view) == 0:
        return torch.zeros(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the buffer is writable; torch warns for any buffer
        return torch.frombuffer(view, dtype=dtype).view(shape)
