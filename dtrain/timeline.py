"""Timeline and stall inspector: what every rank did during a step, and who is late.

Timeline (``DTRAIN_TIMELINE=trace.json`` or ``AllReduceStrategy(timeline="trace.json")``)
records, per rank, every forward, backward and optimizer phase, and each gradient
bucket's pack (gradients copied in as backward produces them), transfer (on the
progress thread) and unpack, plus the time backward's end spent blocked on
communication. At shutdown the ranks' events go to rank 0, which writes one Chrome
trace (open it in chrome://tracing or https://ui.perfetto.dev): one process per rank,
a ``compute`` and a ``comm`` row in each, so overlap and stalls are visible at a glance.

Stall inspector: a collective that waits longer than ``DTRAIN_STALL_WARNING_S``
seconds (default 60, as Horovod's HOROVOD_STALL_CHECK_TIME_SECONDS; 0 turns it off)
logs a warning that names the tensors it carries and the ranks that have not arrived,
then keeps waiting until dtrain.init's timeout turns it into a CommTimeout.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional

import dtrain
from dtrain.comm.api import allgather_bytes, register_before_shutdown
from dtrain.errors import ConfigError

log = logging.getLogger("dtrain")

now = time.monotonic  # the clock the C++ progress thread stamps Work with (CLOCK_MONOTONIC)


def stall_seconds() -> float:
    """DTRAIN_STALL_WARNING_S (default 60): how long a wait goes before it warns; 0: never."""
    raw = os.environ.get("DTRAIN_STALL_WARNING_S", "60")
    try:
        s = float(raw)
    except ValueError:
        raise ConfigError(f"DTRAIN_STALL_WARNING_S must be a number of seconds (0 turns the stall warning "
                          f"off), got {raw!r}") from None
    if s < 0:
        raise ConfigError(f"DTRAIN_STALL_WARNING_S must be >= 0 seconds, got {raw!r}")
    return s


def absent_ranks(native_group) -> tuple:
    """(ranks that have not entered the call this rank is waiting in, remote ranks this host cannot
    see), as global ranks, read from the host's shared board."""
    entered = native_group.entered()
    ranks = list(native_group.ranks)
    me = native_group.rank
    mine = entered[me] if 0 <= me < len(entered) else -1
    missing = [(ranks[g], e) for g, e in enumerate(entered) if g != me and 0 <= e < mine]
    unseen = [ranks[g] for g, e in enumerate(entered) if g != me and e < 0]
    return missing, unseen


def wait(work, what: Callable[[], str], native_group, stall_s: float) -> None:
    """``work.wait()``, logging a stall warning each time another `stall_s` seconds pass without
    it finishing. `what()` describes the tensors the call carries."""
    native = getattr(work, "_native", None)
    if stall_s <= 0 or native is None or not hasattr(native_group, "entered"):
        work.wait()  # another backend's handle: nothing to inspect
        return
    waited = 0.0
    while not native.wait(stall_s):
        waited += stall_s
        missing, unseen = absent_ranks(native_group)
        parts = []
        if missing:
            parts.append("rank(s) " + ", ".join(f"{r} (last entered call #{e})" for r, e in missing)
                         + " have not arrived")
        if unseen:
            parts.append("rank(s) " + ", ".join(map(str, unseen)) + " are on other hosts (not visible here)")
        if not parts:
            parts.append("every rank on this host has arrived; the data is still moving")
        log.warning("[rank %d] stall: %s has waited %.0f s in group %s: %s. A rank may be slow (data loading, "
                    "an evaluation only it runs) or running different code; it becomes a CommTimeout after "
                    "dtrain.init(timeout=...). DTRAIN_STALL_WARNING_S sets this warning's delay (0: off)",
                    dtrain.rank(), what(), waited, native_group.name, "; ".join(parts))
    work.wait()  # done: runs the handle's copy-back


class Timeline:
    """One rank's Chrome-trace events; ``close()`` (collective) writes every rank's to `path`.

    Times are time.monotonic() seconds; each rank's are shifted by the moment all ranks left
    the barrier in the constructor, so ranks on different hosts line up."""

    def __init__(self, path: str, group: Optional["dtrain.Group"] = None, collective: bool = True):
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ConfigError(f"timeline must be a file path for the Chrome trace, got {path!r}")
        self.path = os.fspath(path)
        self.group = group
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise ConfigError(f"timeline={self.path!r}: folder {parent!r} does not exist; create it or "
                              "choose another path")
        self.rank = dtrain.rank() if dtrain.is_initialized() else 0
        if collective and dtrain.is_initialized() and dtrain.world_size() > 1:
            dtrain.barrier(group=group)  # the ranks' clocks line up at its end
        self.origin = now()
        self.events: List[dict] = []
        self.closed = False

    def span(self, name: str, cat: str, start: float, end: float, row: str = "compute",
             args: Optional[Dict] = None) -> None:
        ev = {"name": name, "cat": cat, "ph": "X", "ts": round((start - self.origin) * 1e6, 3),
              "dur": round(max(end - start, 0.0) * 1e6, 3), "pid": self.rank, "tid": row}
        if args:
            ev["args"] = args
        self.events.append(ev)

    def _gather(self) -> List[List[dict]]:
        if not dtrain.is_initialized() or dtrain.world_size() == 1:
            return [self.events]
        return [json.loads(b) for b in allgather_bytes(json.dumps(self.events).encode(), group=self.group)]

    def close_alone(self) -> Optional[str]:
        """At exit without dtrain.shutdown(): the other ranks may be gone, so each rank writes its
        own events, to `path` on one rank and to ``<path>.rank<R>`` otherwise."""
        if self.closed:
            return None
        self.closed = True
        world = dtrain.world_size() if dtrain.is_initialized() else 1
        path = self.path if world == 1 else f"{self.path}.rank{self.rank}"
        self._write(path, [(self.rank, self.events)])
        return path

    def close(self) -> Optional[str]:
        """Every rank calls it (shutdown does); rank 0 writes the file atomically. Returns the path
        on rank 0."""
        if self.closed:
            return None
        self.closed = True
        per_rank = self._gather()
        if self.rank != 0:
            return None
        ranks = self.group.ranks if self.group is not None else range(len(per_rank))
        self._write(self.path, list(zip(ranks, per_rank)))
        return self.path

    @staticmethod
    def _write(path: str, per_rank: list) -> None:
        events = []
        for r, evs in per_rank:
            events.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}})
            events.append({"name": "process_sort_index", "ph": "M", "pid": r, "args": {"sort_index": r}})
            for row, order in (("compute", 0), ("comm", 1)):
                events.append({"name": "thread_sort_index", "ph": "M", "pid": r, "tid": row,
                               "args": {"sort_index": order}})
            events.extend(evs)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def from_env(explicit: Optional[str], group=None) -> Optional[Timeline]:
    """The strategy's timeline: `explicit` if given, else DTRAIN_TIMELINE, else None. Closed
    (written) at dtrain.shutdown()."""
    path = explicit if explicit is not None else os.environ.get("DTRAIN_TIMELINE") or None
    if not path:
        return None
    tl = Timeline(path, group)
    register_before_shutdown(tl.close)
    atexit.register(tl.close_alone)
    return tl


__all__ = ["Timeline", "stall_seconds", "absent_ranks", "wait", "from_env"]
