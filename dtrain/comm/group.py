"""Groups, Work handles, and the process's default group."""

from __future__ import annotations

import os
import zlib
from typing import Callable, Optional, Sequence


from dtrain import _C
from dtrain.errors import CommTimeout, ConfigError


class Group:
    """A communicator over some of the world's ranks (the world is a Group too).

    Made by ``dtrain.new_group(ranks)``; pass it as ``group=`` to any collective.
    Ranks outside the group get a Group object too, but calling a collective on it
    raises ConfigError.
    """

    def __init__(self, native: "_C.Group"):
        self._native = native

    @property
    def rank(self) -> int:
        """This process's rank within the group, or -1 if it is not a member."""
        return self._native.rank

    @property
    def size(self) -> int:
        return self._native.size

    @property
    def ranks(self) -> list:
        """Global ranks of the members, in group-rank order."""
        return list(self._native.ranks)

    def __repr__(self) -> str:
        return f"Group(name={self._native.name!r}, ranks={self.ranks}, rank={self.rank})"


class Work:
    """Handle of an ``async_op=True`` call. ``wait()`` returns the call's result."""

    def __init__(self, native: "_C.Work", result=None, finalize: Optional[Callable[[], None]] = None,
                 keep=()):
        self._native = native
        self._result = result
        self._finalize = finalize
        self._keep = keep  # tensors the C++ side reads or writes until the call is done
        self._done = False

    def wait(self, timeout: Optional[float] = None):
        """Blocks until the call is done and returns its result (the tensor, for in-place calls).

        Raises:
            CommTimeout: `timeout` seconds passed and the call is still running (it goes on).
            CommError: the call failed (the message names the rank and the reason).
        """
        if not self._done:
            if not self._native.wait(timeout):
                raise CommTimeout(f"Work.wait: the call is still running after {timeout} s; "
                                  "wait again, or raise the timeout")
            if self._finalize is not None:
                self._finalize()
            self._done, self._keep = True, ()
        return self._result

    def is_completed(self) -> bool:
        return self._native.is_completed()


class Runtime:
    """What dtrain.init() sets up: the world's connections and the default group."""

    def __init__(self, world: "_C.World", timeout: float, backend: str):
        self.world = world
        self.timeout = timeout
        self.backend = backend
        self.default = Group(_C.Group(world, list(range(world.size)), 0, "world", timeout))
        self._groups_made = 0

    def new_group(self, ranks: Sequence[int]) -> Group:
        ranks = [int(r) for r in ranks]
        self._groups_made += 1
        # Every rank calls new_group in the same order, so (ranks, count) is the same everywhere.
        key = f"{self._groups_made}:{','.join(map(str, ranks))}".encode()
        gid = (zlib.crc32(key) & 0x7FFFFFFF) | 1  # never 0, the world's id
        name = f"group{self._groups_made}[{','.join(map(str, ranks))}]"
        return Group(_C.Group(self.world, ranks, gid, name, self.timeout))


class _Current:
    """Holder of the process's Runtime: the one place that knows the default group."""

    runtime: Optional[Runtime] = None

    @classmethod
    def get(cls) -> Runtime:
        if cls.runtime is None:
            raise ConfigError("dtrain is not initialised in this process: call dtrain.init() first")
        return cls.runtime


def current() -> Runtime:
    return _Current.get()


def resolve(group: Optional[Group]) -> "_C.Group":
    if group is None:
        return _Current.get().default._native
    if not isinstance(group, Group):
        raise ConfigError(f"group must be a dtrain.Group from dtrain.new_group() or None, "
                          f"got {type(group).__name__}")
    return group._native


def env_bytes(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


__all__ = ["Group", "Work", "Runtime", "current", "resolve", "env_bytes"]
