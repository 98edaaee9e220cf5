"""Starting N ranks on this host and watching them.

The launcher binds the rendezvous port itself and hands the listening socket to
rank 0 (DTRAIN_STORE_FD), so the port it advertises can never be taken by
another job in between. Each rank runs in its own session so that signals reach
exactly the processes we mean.

With a `Node` (one launcher per host: `dtrain-run --nnodes/--node-rank`, as torchrun
does) the launcher starts this node's share of a larger world: global ranks
node_rank * nprocs ... + nprocs - 1, all meeting at the master address; node 0 binds
the master port. A failure stops this node's ranks; the other nodes' ranks learn it
from the collectives (a dead peer is an error naming its rank within seconds) and
their launchers stop in turn.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

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


def exit_status(code: int) -> int:
    """A shell's exit status for a process's return code (128 + signal when killed)."""
    return code if code > 0 else 128 - code


def job_token() -> str:
    """The job's secret: DTRAIN_JOB_TOKEN when exported, else a fresh one."""
    return os.environ.get("DTRAIN_JOB_TOKEN") or secrets.token_hex(32)


def signal_sessions(procs: Sequence[subprocess.Popen], sig: int) -> None:
    """`sig` to the session (process group) of every process still running."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def wait_for_exit(procs: Sequence[subprocess.Popen], seconds: float, poll: float = 0.05) -> None:
    """Returns once every process has exited, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(poll)


def stop_sessions(procs: Sequence[subprocess.Popen], first: int, grace: float) -> None:
    """`first` to every running process's session, SIGKILL after `grace` seconds; waits for all."""
    signal_sessions(procs, first)
    wait_for_exit(procs, grace)
    signal_sessions(procs, signal.SIGKILL)
    for p in procs:
        p.wait()


def watch(procs: Sequence[subprocess.Popen], timeout: Optional[float] = None,
          ignore: Sequence[int] = ()) -> Tuple[Optional[int], int]:
    """Polls until a process fails, all succeed, or `timeout` seconds pass. Returns (index, return
    code) of the first failure, (None, 0) when every one succeeded, (None, 124) on timeout.
    Processes listed in `ignore` (indices) count as neither."""
    start = time.monotonic()
    while True:
        codes = [None if i in ignore else p.poll() for i, p in enumerate(procs)]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            return failed[0]
        if all(c == 0 for i, c in enumerate(codes) if i not in ignore):
            return None, 0
        if timeout is not None and time.monotonic() - start > timeout:
            return None, 124
        time.sleep(0.05)


LAUNCH_DIR_ENV = "DTRAIN_LAUNCH_DIR"


def mark_expendable(rank: int, why: str) -> None:
    """Tells dtrain-run that this rank may fail without stopping the job (a parameter-server
    worker: the others go on without it). Does nothing outside dtrain-run."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if folder and os.path.isdir(folder):
        with open(os.path.join(folder, f"expendable-{rank}"), "w") as f:
            f.write(why)


def expendable(folder: Optional[str], rank: int) -> Optional[str]:
    """Why `rank` marked itself expendable, or None."""
    try:
        with open(os.path.join(folder, f"expendable-{rank}")) as f:
            return f.read()
    except (OSError, TypeError):
        return None


def job_env(rank: int, size: int, port: int, token: str, base: Optional[Dict[str, str]] = None,
            addr: str = "127.0.0.1", local_rank: Optional[int] = None, local_size: Optional[int] = None,
            host_id: Optional[str] = None) -> Dict[str, str]:
    """The env contract for one rank (dtrain's names, and torchrun's for torch.distributed).
    Local rank and size default to the global ones (every rank on this host)."""
    local_rank = rank if local_rank is None else local_rank
    local_size = size if local_size is None else local_size
    env = dict(os.environ if base is None else base)
    env.update({
        "DTRAIN_RANK": str(rank), "DTRAIN_WORLD_SIZE": str(size),
        "DTRAIN_LOCAL_RANK": str(local_rank), "DTRAIN_LOCAL_SIZE": str(local_size),
        "DTRAIN_MASTER_ADDR": addr, "DTRAIN_MASTER_PORT": str(port), "DTRAIN_JOB_TOKEN": token,
        "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_size), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    })
    if host_id is not None:
        env["DTRAIN_HOST_ID"] = host_id
    env.pop("DTRAIN_STORE_FD", None)
    return env


def store_listener(addr: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (on a free port unless one is given), to be inherited by rank 0."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((addr, port))
    except OSError as e:
        s.close()
        raise DtrainError(f"dtrain-run could not listen on {addr or '*'}:{port} for the rendezvous ({e.strerror}): "
                          "another job may hold the port; pick a free one with --master-port") from None
    s.listen(128)
    return s


@dataclasses.dataclass
class Node:
    """This launcher's place in a multi-node job (one launcher per host)."""
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    first_rank: Optional[int] = None  # this node's first global rank (default: node_rank * nprocs)
    world_size: Optional[int] = None  # all nodes' ranks (default: nnodes * nprocs); -H may differ per host

    def check(self) -> None:
        if self.nnodes < 1:
            raise DtrainError(f"--nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise DtrainError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} (--nnodes "
                              f"{self.nnodes}): number the nodes 0 to nnodes-1, node 0 on the master's host")
        if not 0 < self.master_port < 65536:
            raise DtrainError(f"--master-port {self.master_port} is not a TCP port (1..65535)")
        if not self.master_addr:
            raise DtrainError("--nnodes > 1 needs --master-addr: the address of node 0's host, which every "
                              "node can reach")


class LocalJob:
    """N processes of one command, output prefixed with the rank, stopped together."""

    def __init__(self, command: List[str], nprocs: int, prefix: bool = True, grace: float = 3.0,
                 out=None, err=None, node: Optional[Node] = None):
        self.command, self.nprocs, self.prefix, self.grace = command, nprocs, prefix, grace
        self.out, self.err = out or sys.stdout, err or sys.stderr
        if node is not None:
            node.check()
        self.node = node
        self.first_rank = 0 if node is None else node.node_rank * nprocs if node.first_rank is None else node.first_rank
        self.world = nprocs if node is None else node.nnodes * nprocs if node.world_size is None else node.world_size
        if not 0 <= self.first_rank <= self.world - nprocs:
            raise DtrainError(f"ranks {self.first_rank}..{self.first_rank + nprocs - 1} do not fit a world of "
                              f"{self.world}: check --first-rank/--world-size")
        self.procs: List[subprocess.Popen] = []
        self.tails = [collections.deque(maxlen=TAIL_LINES) for _ in range(nprocs)]
        self._pumps: List[threading.Thread] = []
        self._write_lock = threading.Lock()
        self.launch_dir: Optional[str] = None  # where ranks leave notes for the launcher

    def start(self) -> None:
        node = self.node
        if node is None:
            token = job_token()
            listener = store_listener()
            addr, port, host_id = "127.0.0.1", listener.getsockname()[1], None
        else:
            # Every node must hold the same token; none can be made up here. Without one the
            # ranks derive a public one and rank 0 warns (see dtrain.comm.rendezvous).
            token = os.environ.get("DTRAIN_JOB_TOKEN", "")
            listener = store_listener("", node.master_port) if node.node_rank == 0 else None
            addr, port = node.master_addr, node.master_port
            # Ranks with one host id share memory; this node's ranks are one host, whatever the
            # machine (two node launchers on one machine, as in the test bed, talk TCP).
            host_id = os.environ.get("DTRAIN_HOST_ID") or f"node{node.node_rank}"
        self.launch_dir = tempfile.mkdtemp(prefix="dtrain-run-")
        try:
            for i in range(self.nprocs):
                rank = self.first_rank + i
                env = job_env(rank, self.world, port, token, addr=addr, local_rank=i, local_size=self.nprocs,
                              host_id=host_id)
                env[LAUNCH_DIR_ENV] = self.launch_dir
                fds = ()
                if rank == 0:
                    env["DTRAIN_STORE_FD"] = str(listener.fileno())
                    fds = (listener.fileno(),)
                p = subprocess.Popen(self.command, env=env, pass_fds=fds, start_new_session=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                self.procs.append(p)
                for stream, sink in ((p.stdout, self.out), (p.stderr, self.err)):
                    t = threading.Thread(target=self._pump, args=(i, stream, sink), daemon=True)
                    t.start()
                    self._pumps.append(t)
        except OSError as e:
            self.kill_all(signal.SIGKILL)
            raise DtrainError(f"dtrain-run could not start {self.command[0]!r}: {e}") from None
        finally:
            if listener is not None:
                listener.close()  # rank 0 holds its own copy now

    def tag(self, i: int) -> str:
        """Output prefix of local process i: its rank, and its node in a multi-node job."""
        rank = self.first_rank + i
        return f"[node{self.node.node_rank}:{rank}] " if self.node and self.node.nnodes > 1 else f"[{rank}] "

    def _pump(self, i: int, stream, sink) -> None:
        """Copies local process i's output, tagging each line. A segment ending in a carriage
        return (a progress bar redrawing itself) goes out at once with its tag, so bars stay live."""
        tag = self.tag(i) if self.prefix else ""
        rank = i
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

    def stop(self, first: int = signal.SIGTERM) -> None:
        self.kill_all(first)

    def kill_all(self, first: int = signal.SIGTERM) -> None:
        """`first` to everyone still running, SIGKILL after the grace period."""
        stop_sessions(self.procs, first, self.grace)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits for every rank. On the first failure stops the rest and reports it.

        Returns the job's exit status: 0, or the failed rank's code (128+signal if killed).
        """
        gone: List[int] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            i, code = watch(self.procs, left, ignore=gone)
            why = expendable(self.launch_dir, self.first_rank + i) if i is not None else None
            if why is None:
                break
            gone.append(i)
            self.err.write(f"dtrain-run: rank {self.first_rank + i} failed ({describe_exit(code)}); it is {why}, "
                           f"so the job goes on without it\n")
            self.err.flush()
        if i is None and code == 0:
            self._drain()
            return 0
        running = [self.first_rank + k for k, p in enumerate(self.procs) if p.poll() is None]
        if i is not None:
            # The others' collectives fail within seconds of a peer's death and name it: let them
            # say so before they are stopped (SIGTERM would cut that message off).
            wait_for_exit(self.procs, self.grace)
        self.kill_all()
        self._drain()
        if i is not None:
            self._report(i, code)
            return exit_status(code)
        self.err.write(f"dtrain-run: timed out after {timeout} s; rank(s) {running} still running\n")
        return 124

    def _drain(self) -> None:
        for t in self._pumps:
            t.join(timeout=5)
        if self.launch_dir:
            shutil.rmtree(self.launch_dir, ignore_errors=True)

    def _report(self, i: int, code: int) -> None:
        rank = self.first_rank + i
        where = f" on node {self.node.node_rank}" if self.node and self.node.nnodes > 1 else ""
        others = "this node's other ranks" if where else "the other ranks"
        lines = "\n".join(f"    {self.tag(i)}{line}" for line in self.tails[i]) or "    (no output)"
        self.err.write(f"dtrain-run: rank {rank}{where} failed ({describe_exit(code)}); stopped {others}. "
                       f"Last lines of rank {rank}:\n{lines}\n")
        self.err.flush()
