"""TFRecordDataset: TFRecord files to dicts of torch tensors, read and parsed in C++.

    ds = TFRecordDataset("train-*.tfrecord", spec).batch(256, drop_remainder=True)
    for batch in ds:        # {"image": uint8 [256, 3072], "label": int64 [256], ...}
        ...

Reading, CRC checks, decompression and Example parsing run in C++ without the GIL,
straight into the batch's column buffers, which become tensors without a copy.
"""

from __future__ import annotations

import copy
import glob
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch

from dtrain.data.spec import TORCH, FixedLen, VarLen, to_schema
from dtrain.data.tfrecord import _compression, _skip
from dtrain.errors import ConfigError, DataError

_UNBATCHED_CHUNK = 256  # records parsed per C++ call when yielding single records


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
    """

    def __init__(self, files_or_glob, spec: Optional[Dict[str, Any]] = None, compression: Optional[str] = None,
                 on_error: str = "raise", sequence: bool = False, verify_crc: bool = True,
                 buffer_bytes: int = 1 << 20):
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
        self._schema = to_schema(spec, self.sequence) if spec is not None else None
        self._batch_size: Optional[int] = None
        self._drop_remainder = False
        self._stats: Dict[str, int] = {}
        self._problems: List[str] = []
        self._check_files()

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
        new._stats, new._problems = {}, []
        return new

    def batch(self, batch_size: int, drop_remainder: bool = False) -> "TFRecordDataset":
        """Batches of `batch_size` records: FixedLen -> [B, *shape]; VarLen -> padded [B, L]
        plus `<name>_lengths` [B]; bytes -> lists."""
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if self._batch_size is not None:
            raise ConfigError("this dataset is batched already")
        new = self._derive()
        new._batch_size, new._drop_remainder = batch_size, bool(drop_remainder)
        return new

    # ---------------------------------------------------------------- iteration
    def _loader(self, batch_size: int, drop: bool):
        from dtrain import _C
        files = [f for f in self.files if os.path.getsize(f) > 0]
        return _C.data.Loader(files, self.compression, self._schema, batch_size, drop, self._skip,
                              self.verify_crc, self.buffer_bytes)

    def __iter__(self) -> Iterator[Any]:
        if self._schema is None:
            yield from self._iter_raw()
            return
        batched = self._batch_size is not None
        loader = self._loader(self._batch_size if batched else _UNBATCHED_CHUNK, self._drop_remainder if batched else False)
        try:
            while True:
                b = loader.next()
                if b is None:
                    break
                cols = columns(self.spec, b)
                if batched:
                    yield cols
                else:
                    yield from self._rows(cols, b.rows)
        finally:
            self._stats, self._problems = dict(loader.stats()), list(loader.problems())

    def _iter_raw(self):
        loader = self._loader(1, False)
        batch: List[bytes] = []
        try:
            while True:
                recs = loader.next_raw(self._batch_size or _UNBATCHED_CHUNK)
                if not recs:
                    break
                if self._batch_size is None:
                    yield from recs
                    continue
                batch += recs
                while len(batch) >= self._batch_size:
                    yield batch[: self._batch_size]
                    batch = batch[self._batch_size:]
            if batch and not self._drop_remainder:
                yield batch
        finally:
            self._stats, self._problems = dict(loader.stats()), list(loader.problems())

    def _rows(self, cols: Dict[str, Any], rows: int):
        for r in range(rows):
            rec = {}
            for name, f in self.spec.items():
                v = cols[name][r]
                if isinstance(f, VarLen):
                    n = int(cols[name + "_lengths"][r])
                    v = v[:n] if f.dtype == "bytes" else v[:n].clone()
                elif isinstance(v, torch.Tensor):
                    v = v.clone()  # its own storage, not a view pinning the whole chunk
                rec[name] = v
            yield rec

    def stats(self) -> Dict[str, int]:
        """Counters of the last (or current) pass: records, bytes, bad_records (framing),
        bad_examples (parsing), batches."""
        return dict(self._stats)

    def problems(self) -> List[str]:
        """Messages of the records skipped in the last pass (first 100)."""
        return list(self._problems)


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
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the buffer is writable; torch warns for any buffer
        return torch.frombuffer(view, dtype=dtype).view(shape)
