"""A multi-host test bed on one machine: hosts are network namespaces on one bridge.

    from dtrain.testing.cluster import Cluster

    with Cluster(hosts=2, rate="10gbit", delay="100us") as c:
        p = c.popen(1, ["python", "-c", "print('hello from host 1')"])
        c.hosts[0].addr            # "10.77.<n>.1"

Each host is a namespace with its own loopback and one interface, ``eth0``, with its
own address; the other end of its veth pair is a port of a bridge that lives in a
namespace of its own, so no traffic ever touches the machine's real interfaces.
A rate limits each host's egress (tbf), a delay adds one-way latency (netem); a flow
from A to B is shaped by A's egress, so every link direction has the rate given.

Everything is torn down on exit from the ``with`` block, on an exception, on
SIGTERM/SIGINT, and at interpreter exit; namespaces left behind by a test bed whose
process was killed outright (SIGKILL) are removed by the next one. Needs root and
iproute2 (``ip``, ``tc``): :func:`available` says whether this machine has both.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from dtrain.errors import DtrainError

_PREFIX = "dtb"  # every namespace this module makes starts with it: dtb<pid>x<k>-...


class ClusterError(DtrainError):
    """The test bed could not be built (no root, no iproute2, a failing ip/tc command)."""


def available() -> Optional[str]:
    """None when a test bed can be built here, else the reason it cannot (for pytest.skip)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, or in a container with CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not on PATH (apt-get install iproute2)"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (subprocess.SubprocessError, OSError) as e:
        return f"'ip netns list' failed ({e}); this kernel or container does not allow network namespaces"
    return None


def _sh(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise ClusterError(f"test bed: `{shlex.join(argv)}` failed (exit {p.returncode}): "
                           f"{p.stderr.strip() or p.stdout.strip()}")
    return p


_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)(bit|bps)$", re.I)


def rate_bytes_per_s(rate: str) -> float:
    """'10gbit' -> 1.25e9, '800mbps' -> 8e8 (tc's units: bit = bits/s, bps = bytes/s)."""
    m = _RATE.match(rate.strip())
    if not m:
        raise ValueError(f"rate {rate!r} is not a tc rate; write it like '10gbit', '1gbit', '500mbit' or '100mbps'")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    return value / 8 if m.group(3).lower() == "bit" else value


def remote_shell_agent(directory: str) -> str:
    """Writes (into `directory`) and returns an executable `AGENT HOST CMD...` that runs CMD on the
    test-bed host whose netns is HOST: what dtrain-run --remote-shell (one CMD string, as ssh) and
    mpirun's plm_rsh_agent (CMD in several words) take."""
    path = os.path.join(str(directory), "netns-agent")
    with open(path, "w") as f:
        f.write('#!/bin/sh\nhost="$1"; shift\nexec ip netns exec "$host" sh -c "$*"\n')
    os.chmod(path, 0o755)
    return path


@dataclass
class Host:
    index: int
    netns: str
    addr: str
    ifname: str = "eth0"

    def wrap(self, argv: Sequence[str]) -> List[str]:
        """argv that runs `argv` on this host."""
        return ["ip", "netns", "exec", self.netns, *argv]


class Cluster:
    """H hosts as network namespaces on one bridge; use as a context manager."""

    _live: Dict[int, "Cluster"] = {}
    _lock = threading.Lock()
    _count = 0

    def __init__(self, hosts: int = 2, rate: Optional[str] = None, delay: Optional[str] = None):
        if not isinstance(hosts, int) or not 1 <= hosts <= 250:
            raise ValueError(f"hosts={hosts!r}: a test bed has 1 to 250 hosts")
        if rate is not None:
            rate_bytes_per_s(rate)  # validates
        if delay is not None and not re.match(r"^\d+(\.\d+)?(us|ms|s)$", delay):
            raise ValueError(f"delay {delay!r} is not a tc time; write it like '100us' or '2ms'")
        self.rate, self.delay = rate, delay
        with Cluster._lock:
            Cluster._count += 1
            k = Cluster._count
        self.tag = f"{_PREFIX}{os.getpid()}x{k}"
        self.subnet = f"10.{77 + (os.getpid() + k) % 100}.{k % 250}"
        self.switch = f"{self.tag}-sw"
        self.hosts = [Host(i, f"{self.tag}-h{i}", f"{self.subnet}.{i + 1}") for i in range(hosts)]
        self._up = False

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Cluster":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        why = available()
        if why:
            raise ClusterError(f"cannot build a test bed: {why}")
        _remove_orphans()
        _install_cleanup()
        with Cluster._lock:
            Cluster._live[id(self)] = self
        self._up = True
        try:
            _sh(["ip", "netns", "add", self.switch])
            _sh(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
            _sh(["ip", "-n", self.switch, "link", "set", "br0", "up"])
            for h in self.hosts:
                _sh(["ip", "netns", "add", h.netns])
                port = f"p{h.index}"
                # Both ends are created in the host namespace, then one moves to the switch.
                _sh(["ip", "-n", h.netns, "link", "add", h.ifname, "type", "veth", "peer", "name", port])
                _sh(["ip", "-n", h.netns, "link", "set", port, "netns", self.switch])
                _sh(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
                _sh(["ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.ifname])
                _sh(["ip", "-n", h.netns, "link", "set", h.ifname, "up"])
                _sh(["ip", "-n", h.netns, "link", "set", "lo", "up"])
                self._shape(h)
        except BaseException:
            self.down()
            raise

    def _shape(self, h: Host) -> None:
        tc = ["ip", "netns", "exec", h.netns, "tc", "qdisc", "add", "dev", h.ifname]
        parent = ["root"]
        if self.delay:
            p = _sh(tc + ["root", "handle", "1:", "netem", "delay", self.delay, "limit", "100000"], check=False)
            if p.returncode != 0:
                raise ClusterError(f"cannot add a {self.delay} delay: tc netem failed ({p.stderr.strip()}); "
                                   "this kernel lacks the netem qdisc (sch_netem), so leave delay=None here")
            parent = ["parent", "1:1"]
        if self.rate:
            # The bucket holds ~1 ms at the rate (at least 64 KiB): large enough that the
            # kernel's timer granularity does not cap the rate, small enough to shape.
            burst = max(64 << 10, int(rate_bytes_per_s(self.rate) / 1000))
            _sh(tc + parent + ["handle", "2:", "tbf", "rate", self.rate, "burst", str(burst),
                               "latency", "20ms"])

    def down(self) -> None:
        if not self._up:
            return
        self._up = False
        for h in self.hosts:
            _kill_netns_pids(h.netns)
            _sh(["ip", "netns", "del", h.netns], check=False)
        _sh(["ip", "netns", "del", self.switch], check=False)
        with Cluster._lock:
            Cluster._live.pop(id(self), None)

    # ------------------------------------------------------------ running

    def popen(self, host: int, argv: Sequence[str], env: Optional[dict] = None, **kw) -> subprocess.Popen:
        """Starts `argv` on host `host` (stdout/stderr as given in kw)."""
        if not self._up:
            raise ClusterError("the test bed is down; use it inside `with Cluster(...) as c:`")
        return subprocess.Popen(self.hosts[host].wrap(argv), env=env, **kw)

    def run(self, host: int, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Runs `argv` on host `host` to completion and returns its CompletedProcess."""
        if not self._up:
            raise ClusterError("the test bed is down; use it inside `with Cluster(...) as c:`")
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.hosts[host].wrap(argv), timeout=timeout, **kw)

    def launch(self, argv: Sequence[str], ranks: int, env: Optional[dict] = None, timeout: float = 1800,
               log_dir: Optional[str] = None) -> List[Tuple[int, str]]:
        """Runs `argv` as a dtrain job of `ranks` ranks spread evenly over the hosts (rank r on
        host r // ceil(ranks/hosts)), each with the environment dtrain-run would give it and
        GLOO_SOCKET_IFNAME set for torch.distributed. Returns every rank's (exit code, output);
        a rank still running after `timeout` seconds is killed (exit code -9)."""
        import secrets
        import tempfile
        per_host = -(-ranks // len(self.hosts))
        port = 20000 + secrets.randbelow(20000)
        token = secrets.token_hex(16)
        out: List[Tuple[int, str]] = []
        with tempfile.TemporaryDirectory(prefix="dtrain-testbed-", dir=log_dir) as tmp:
            procs = []
            for r in range(ranks):
                h = r // per_host
                e = {k: v for k, v in (env if env is not None else os.environ).items() if k != "DTRAIN_STORE_FD"}
                e.update(DTRAIN_RANK=str(r), DTRAIN_WORLD_SIZE=str(ranks), DTRAIN_LOCAL_RANK=str(r % per_host),
                         DTRAIN_LOCAL_SIZE=str(min(per_host, ranks - h * per_host)),
                         DTRAIN_MASTER_ADDR=self.hosts[0].addr, DTRAIN_MASTER_PORT=str(port),
                         DTRAIN_JOB_TOKEN=token, DTRAIN_HOST_ID=self.hosts[h].netns,
                         GLOO_SOCKET_IFNAME=self.hosts[h].ifname)
                log = open(os.path.join(tmp, f"rank{r}.log"), "w")
                procs.append((self.popen(h, list(argv), env=e, stdout=log, stderr=subprocess.STDOUT), log))
            deadline = time.monotonic() + timeout
            for p, log in procs:
                try:
                    rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    rc = p.wait()
                log.close()
                with open(log.name) as f:
                    out.append((rc, f.read()))
        return out

    def __repr__(self) -> str:
        return (f"Cluster({len(self.hosts)} hosts {', '.join(h.addr for h in self.hosts)}, "
                f"rate={self.rate}, delay={self.delay}, {'up' if self._up else 'down'})")


def _kill_netns_pids(netns: str) -> None:
    p = _sh(["ip", "netns", "pids", netns], check=False)
    for pid in p.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _remove_orphans() -> None:
    """Deletes namespaces left by a test bed whose process is gone."""
    p = _sh(["ip", "netns", "list"], check=False)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.match(rf"^{_PREFIX}(\d+)x\d+-", name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # its owner is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_netns_pids(name)
        _sh(["ip", "netns", "del", name], check=False)


_installed = False


def _down_all() -> None:
    for c in list(Cluster._live.values()):
        c.down()


def _install_cleanup() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(_down_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            _down_all()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)
