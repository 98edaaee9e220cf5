"""hvd.start_timeline / stop_timeline and HOROVOD_TIMELINE: a Chrome trace of this rank's
collectives (name, kind, size, start to finish) and, with a DistributedOptimizer, of its
gradient buckets (see dtrain.timeline). As in Horovod, rank 0 records and writes the file;
other ranks may call these functions and record nothing. Open it in chrome://tracing."""

from __future__ import annotations

import atexit
import os
from typing import Optional

import dtrain
from dtrain import timeline as tl
from dtrain.errors import ConfigError


class _Active:
    timeline: Optional[tl.Timeline] = None


def current() -> Optional[tl.Timeline]:
    return _Active.timeline


def start_timeline(file_path, mark_cycles: bool = False) -> None:
    """Starts recording to `file_path` (rank 0 writes it at stop_timeline() or hvd.shutdown()).
    `mark_cycles` is accepted for Horovod's signature; dtrain has no background cycle to mark."""
    if not isinstance(file_path, (str, os.PathLike)) or not str(file_path):
        raise ConfigError(f"start_timeline takes a file path, got {file_path!r}")
    if _Active.timeline is not None:
        raise ConfigError(f"a timeline is being recorded to {_Active.timeline.path!r} already: "
                          "call hvd.stop_timeline() first")
    if dtrain.rank() != 0:
        return
    _Active.timeline = tl.Timeline(file_path, collective=False)
    from dtrain.horovod import optimizer
    optimizer.attach_timeline(_Active.timeline)


def stop_timeline() -> None:
    """Stops recording and writes the file (rank 0)."""
    t, _Active.timeline = _Active.timeline, None
    if t is None:
        return
    from dtrain.horovod import optimizer
    optimizer.attach_timeline(None)
    t.closed = True
    t._write(t.path, [(t.rank, t.events)])


def from_env() -> None:
    path = os.environ.get("HOROVOD_TIMELINE")
    if path and dtrain.rank() == 0 and _Active.timeline is None:
        start_timeline(path)
        atexit.register(stop_timeline)


def open_span(what: str, name: Optional[str], tensor):
    """A started span for the timeline (None when none is recorded: the common, free case)."""
    if _Active.timeline is None:
        return None
    return (what, name, tl.now(), None if tensor is None else (tuple(tensor.shape), str(tensor.dtype)[6:]))


def close_span(span) -> None:
    t = _Active.timeline
    if span is None or t is None:
        return
    what, name, start, info = span
    args = {"name": name} if name else {}
    if info is not None:
        args.update(shape=list(info[0]), dtype=info[1])
    t.span(what if not name else f"{what} {name}", "horovod", start, tl.now(), row="comm", args=args)


__all__ = ["start_timeline", "stop_timeline"]
