"""Starting N ranks on this host and watching them.

The launcher binds the rendezvous port itself and hands the listening socket to
rank 0 (DTRAIN_STORE_FD), so the port it advertises can never be taken by
another job in between. Each rank runs in its own session so that signals reach
exactly the processes we mean.
"""

from __future__ import annotations

import collections
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from dtrain.errors import DtrainError

TAIL_LINES = 20


class RankFailed(DtrainError):
    """A rank exited with an error; `rank`, `exitcode` and `tail` (its last lines) say which and how."""

    def __init__(self, message: str, rank: int, exitcode: Optional[int], tail: Sequence[str] = ()):
        super().__init__(message)
        self.rank, self.exitcode, self.tail = rank, exitcode, list(tail)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def job_env(rank: int, size: int, port: int, token: str, base: Optional[Dict[str, str]] = None,
            addr: str = "127.0.0.1") -> Dict[str, str]:
    """The env contract for one local rank (dtrain's names, and torchrun's for torch.distributed)."""
    env = dict(os.environ if base is None else base)
    env.update({
        "DTRAIN_RANK": str(rank), "DTRAIN_WORLD_SIZE": str(size),
        "DTRAIN_LOCAL_RANK": str(rank), "DTRAIN_LOCAL_SIZE": str(size),
        "DTRAIN_MASTER_ADDR": addr, "DTRAIN_MASTER_PORT": str(port), "DTRAIN_JOB_TOKEN": token,
        "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("DTRAIN_STORE_FD", None)
    return env


def store_listener(addr: str = "127.0.0.1") -> socket.socket:
    """A listening socket on a free port, to be inherited by rank 0."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((addr, 0))
    s.listen(128)
    return s


class LocalJob:
    """N processes of one command, output prefixed with the rank, stopped together."""

    def __init__(self, command: List[str], nprocs: int, prefix: bool = True, grace: float = 3.0,
                 out=None, err=None):
        self.command, self.nprocs, self.prefix, self.grace = command, nprocs, prefix, grace
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.procs: List[subprocess.Popen] = []
        self.tails = [collections.deque(maxlen=TAIL_LINES) for _ in range(nprocs)]
        self._pumps: List[threading.Thread] = []
        self._write_lock = threading.Lock()

    def start(self) -> None:
        token = os.environ.get("DTRAIN_JOB_TOKEN") or secrets.token_hex(32)
        listener = store_listener()
        port = listener.getsockname()[1]
        try:
            for rank in range(self.nprocs):
                env = job_env(rank, self.nprocs, port, token)
                fds = ()
                if rank == 0:
                    env["DTRAIN_STORE_FD"] = str(listener.fileno())
                    fds = (listener.fileno(),)
                p = subprocess.Popen(self.command, env=env, pass_fds=fds, start_new_session=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                self.procs.append(p)
                for stream, sink in ((p.stdout, self.out), (p.stderr, self.err)):
                    t = threading.Thread(target=self._pump, args=(rank, stream, sink), daemon=True)
                    t.start()
                    self._pumps.append(t)
        except OSError as e:
            self.kill_all(signal.SIGKILL)
            raise DtrainError(f"dtrain-run could not start {self.command[0]!r}: {e}") from None
        finally:
            listener.close()  # rank 0 holds its own copy now

    def _pump(self, rank: int, stream, sink) -> None:
        """Copies one rank's output, tagging each line. A segment ending in a carriage return
        (a progress bar redrawing itself) goes out at once with its tag, so bars stay live."""
        tag = f"[{rank}] " if self.prefix else ""
        pending = b""
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(1)
            if not chunk:
                break
            pending += chunk
            while True:
                cut = min((i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0), default=-1)
                if cut < 0:
                    break
                seg, end, pending = pending[:cut], pending[cut:cut + 1], pending[cut + 1:]
                text = seg.decode("utf-8", errors="replace")
                if end == b"\n":
                    self.tails[rank].append(text)
                with self._write_lock:
                    sink.write((tag + text if text or end == b"\n" else "") + end.decode())
                    sink.flush()
        if pending:
            text = pending.decode("utf-8", errors="replace")
            self.tails[rank].append(text)
            with self._write_lock:
                sink.write(tag + text + "\n")
                sink.flush()
        stream.close()

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def kill_all(self, first: int = signal.SIGTERM) -> None:
        """`first` to everyone still running, SIGKILL after the grace period."""
        self.signal_all(first)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        self.signal_all(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits for every rank. On the first failure stops the rest and reports it.

        Returns the job's exit status: 0, or the failed rank's code (128+signal if killed).
        """
        start = time.monotonic()
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                self.kill_all()
                self._drain()
                self._report(rank, code)
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                self._drain()
                return 0
            if timeout is not None and time.monotonic() - start > timeout:
                running = [r for r, c in enumerate(codes) if c is None]
                self.kill_all()
                self._drain()
                self.err.write(f"dtrain-run: timed out after {timeout} s; rank(s) {running} still running\n")
                return 124
            time.sleep(0.05)

    def _drain(self) -> None:
        for t in self._pumps:
            t.join(timeout=5)

    def _report(self, rank: int, code: int) -> None:
        lines = "\n".join(f"    [{rank}] {line}" for line in self.tails[rank]) or "    (no output)"
        self.err.write(f"dtrain-run: rank {rank} failed ({describe_exit(code)}); stopped the other ranks. "
                       f"Last lines of rank {rank}:\n{lines}\n")
        self.err.flush()
