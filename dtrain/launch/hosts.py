"""`dtrain-run -H host1:4,host2:4` and `--hostfile`: one node launcher per host, started
through a remote shell (ssh by default; `--remote-shell CMD` replaces it, as Open MPI's
plm_rsh_agent does).

The agent runs as ``CMD HOST 'COMMAND'``: COMMAND is one shell-quoted string, the way ssh
takes it, so a wrapper (``ip netns exec "$1" sh -c "$2"`` on the test bed) works as well as
ssh. Every node runs ``dtrain-run --nnodes ... --node-rank k`` with this launcher's Python
and the job token; their output, already tagged ``[nodeK:rank]``, comes back here. When
one node fails the others are given `grace` seconds to see it through their collectives,
then stopped.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from typing import List, Optional, Sequence, Tuple

from dtrain.errors import ConfigError, DtrainError
from dtrain.launch.local import describe_exit, exit_status, stop_sessions, wait_for_exit, watch

Hosts = List[Tuple[str, int]]

_HOSTNAME = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+$")


def parse_hosts(spec: str) -> Hosts:
    """'a:4,b:2,c' -> [('a', 4), ('b', 2), ('c', 1)] (Horovod's and mpirun's -H)."""
    out: Hosts = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        host, slots = item, "1"
        if ":" in item and re.fullmatch(r"-?\d+", item.rsplit(":", 1)[1]):
            host, slots = item.rsplit(":", 1)
        if not host or not _HOSTNAME.match(host):
            raise DtrainError(f"-H {spec!r}: {item!r} is not host or host:slots (for example node1:4)")
        n = int(slots)
        if n < 1:
            raise DtrainError(f"-H {spec!r}: host {host} has {n} slots; give each host at least 1")
        out.append((host, n))
    if not out:
        raise DtrainError(f"-H {spec!r} names no host; write it as host1:4,host2:4")
    _no_repeats(out, "-H")
    return out


def parse_hostfile(path: str) -> Hosts:
    """Open MPI's hostfile: one host per line, `slots=N` (default 1), `#` comments;
    `max_slots=` and other keys are accepted and ignored."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DtrainError(f"--hostfile {path}: {e.strerror}") from None
    out: Hosts = []
    for no, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        host, slots = words[0], 1
        for w in words[1:]:
            key, eq, value = w.partition("=")
            if key in ("slots", "slot") and eq:
                if not value.isdigit() or int(value) < 1:
                    raise DtrainError(f"--hostfile {path}, line {no}: slots={value!r} must be a positive integer")
                slots = int(value)
            elif not eq:
                raise DtrainError(f"--hostfile {path}, line {no}: {w!r} is not key=value (write: {host} slots=4)")
        out.append((host, slots))
    if not out:
        raise DtrainError(f"--hostfile {path} lists no host")
    _no_repeats(out, f"--hostfile {path}")
    return out


def _no_repeats(hosts: Hosts, what: str) -> None:
    seen = set()
    for h, _ in hosts:
        if h in seen:
            raise DtrainError(f"{what} names host {h} twice: give it once, with all its slots")
        seen.add(h)


def take_slots(hosts: Hosts, total: Optional[int]) -> Hosts:
    """The first `total` slots of `hosts`, host by host (horovodrun -np N -H ...); all of them
    when total is None. Hosts left without a slot are dropped."""
    have = sum(n for _, n in hosts)
    if total is None:
        return hosts
    if not 1 <= total <= have:
        raise ConfigError(f"-np {total} with hosts {','.join(f'{h}:{n}' for h, n in hosts)}: they offer {have} "
                          f"slot(s), so -np must be 1..{have}; add slots (host:N) or lower -np")
    out: Hosts = []
    left = total
    for h, n in hosts:
        if left <= 0:
            break
        out.append((h, min(n, left)))
        left -= min(n, left)
    return out


def node_commands(hosts: Hosts, command: Sequence[str], master_addr: str, master_port: int, token: str,
                  remote_shell: str, extra: Sequence[str] = (), env: Sequence[str] = (),
                  restart: int = 0) -> List[List[str]]:
    """The argv that starts node k's launcher on hosts[k] through the remote shell."""
    agent = shlex.split(remote_shell)
    world = sum(n for _, n in hosts)
    out, first = [], 0
    for k, (host, slots) in enumerate(hosts):
        forward = [f"DTRAIN_JOB_TOKEN={token}", f"DTRAIN_RESTART_COUNT={restart}"] + [f"{name}={os.environ[name]}" for name in env if name in os.environ]
        node = ["env", *forward, sys.executable, "-m", "dtrain.launch", "--nnodes", str(len(hosts)),
                "--node-rank", str(k), "--master-addr", master_addr, "--master-port", str(master_port),
                "--first-rank", str(first), "--world-size", str(world), "-n", str(slots), *extra, *command]
        # The launcher's working directory where the host has it (home otherwise), as mpirun does.
        out.append([*agent, host, f"cd {shlex.quote(os.getcwd())} 2>/dev/null || cd; exec {shlex.join(node)}"])
        first += slots
    return out


class HostsJob:
    """The node launchers of one job, started through the remote shell and watched here."""

    def __init__(self, argvs: List[List[str]], hosts: Hosts, grace: float = 3.0, out=None, err=None):
        self.argvs, self.hosts, self.grace = argvs, hosts, grace
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.procs: List[subprocess.Popen] = []
        self._pumps: List[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        for argv in self.argvs:
            try:
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
            except OSError as e:
                self.stop(signal.SIGKILL)
                raise DtrainError(f"dtrain-run could not start the remote shell {argv[0]!r}: {e.strerror} "
                                  "(set --remote-shell)") from None
            self.procs.append(p)
            for stream, sink in ((p.stdout, self.out), (p.stderr, self.err)):
                t = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                t.start()
                self._pumps.append(t)

    def _pump(self, stream, sink) -> None:
        for line in iter(stream.readline, b""):
            with self._lock:
                sink.write(line.decode("utf-8", errors="replace"))
                sink.flush()
        stream.close()

    def stop(self, first: int = signal.SIGTERM) -> None:
        stop_sessions(self.procs, first, self.grace)

    def wait(self, timeout: Optional[float] = None) -> int:
        """0 when every node succeeded; else the first failed node's status, after the others
        stopped on their own (their collectives fail within seconds) or were stopped."""
        k, code = watch(self.procs, timeout)
        if k is not None:
            wait_for_exit(self.procs, max(self.grace, 10.0), poll=0.1)
        if k is not None or code:
            self.stop()
        self._drain()
        if k is not None:
            self.err.write(f"dtrain-run: node {k} ({self.hosts[k][0]}) failed ({describe_exit(code)}); the job is "
                           "stopped on every host\n")
            self.err.flush()
            return exit_status(code)
        if code:
            self.err.write(f"dtrain-run: timed out after {timeout} s\n")
        return code

    def _drain(self) -> None:
        for t in self._pumps:
            t.join(timeout=5)
