"""TFRecord files without TensorFlow: writing, raw reading and index files.

    with TFRecordWriter("out.tfrecord.gz", compression="gzip") as w:
        w.write({"label": 3, "image": img_uint8_tensor})   # a dict becomes a tf.train.Example
        w.write(b"raw record bytes")                         # bytes go as they are

The file appears under its name only when the writer closes cleanly (it is written
to a temporary name and renamed), so a crash never leaves half a file behind, nor
damages an older file of that name.
"""

from __future__ import annotations

import os
from typing import Iterator, List, Optional, Tuple

from dtrain.data.spec import encode_example
from dtrain.errors import ConfigError


def _compression(c: Optional[str]) -> str:
    if c in (None, "", "none", "None"):
        return ""
    c = c.lower()
    if c not in ("gzip", "zlib"):
        raise ConfigError(f"compression {c!r} is not known: use None, 'gzip' or 'zlib'")
    return c


class TFRecordWriter:
    """Writes records (dicts as Examples, or bytes) to one file, optionally gzip/zlib."""

    def __init__(self, path: str, compression: Optional[str] = None, level: int = -1):
        from dtrain import _C
        self.path = os.fspath(path)
        self._w = _C.data.RecordWriter(self.path, _compression(compression), level)

    def write(self, record) -> None:
        if isinstance(record, dict):
            record = encode_example(record)
        elif not isinstance(record, (bytes, bytearray, memoryview)):
            raise ConfigError(f"write() takes a dict (an Example) or bytes, got {type(record).__name__}")
        self._w.write(record)

    @property
    def records(self) -> int:
        return self._w.records

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        """Finishes the file and moves it under its name."""
        self._w.close()

    def abort(self) -> None:
        """Drops what was written; the file (or an older one of that name) is left as it was."""
        self._w = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_records(path: str, compression: Optional[str] = None, on_error: str = "raise",
                 verify: bool = True) -> Iterator[Tuple[bytes, int]]:
    """(record bytes, byte offset) for every record of one file."""
    from dtrain import _C
    r = _C.data.RecordReader(os.fspath(path), _compression(compression), _skip(on_error), verify)
    while True:
        item = r.next()
        if item is None:
            return
        yield item


def _skip(on_error: str) -> bool:
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error == "skip"


def index_path(path: str) -> str:
    return os.fspath(path) + ".idx"


def build_index(path: str, compression: Optional[str] = None, out: Optional[str] = None) -> List[Tuple[int, int]]:
    """Writes `<path>.idx` ("offset length" per record, as DALI and the tfrecord package
    read it) after checking every record's CRCs; returns the entries. DataError at a bad
    record (the index is then not written)."""
    from dtrain import _C
    from dtrain.parallel.checkpoint import atomic_write
    entries = _C.data.index_file(os.fspath(path), _compression(compression))
    text = "".join(f"{o} {n}\n" for o, n in entries).encode()
    atomic_write(out or index_path(path), text)
    return entries


def read_index(path: str) -> List[Tuple[int, int]]:
    """Entries of an index file (ConfigError naming the line if it is not one)."""
    out = []
    with open(path) as f:
        for k, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                o, n = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise ConfigError(f"{path}:{k}: {line.strip()!r} is not 'offset length'; rebuild it with "
                                  "`dtrain-data index`") from None
            out.append((o, n))
    return out
