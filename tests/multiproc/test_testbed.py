"""The multi-host test bed (dtrain.testing.cluster) and the native backend across its hosts.

Needs root and iproute2; skipped with the reason elsewhere.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dtrain.testing import cluster as tb

from .harness import REPO

pytestmark = [pytest.mark.skipif(tb.available() is not None, reason=str(tb.available())),
              pytest.mark.timeout(180)]


def _netns():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _ours(c):
    return {h.netns for h in c.hosts} | {c.switch}


def test_hosts_have_own_addresses_and_reach_each_other():
    with tb.Cluster(3) as c:
        assert _ours(c) <= _netns()
        addrs = [h.addr for h in c.hosts]
        assert len(set(addrs)) == 3
        for i, h in enumerate(c.hosts):
            shown = c.run(i, ["ip", "-4", "-o", "addr", "show", "dev", h.ifname]).stdout
            assert f"{h.addr}/24" in shown
            # The host sees only its own interface and loopback: not the machine's.
            links = c.run(i, ["ip", "-o", "link"]).stdout
            assert {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()} == {"lo", "eth0"}
        # A TCP round trip from host 2 to host 0 through the bridge.
        server = c.popen(0, [sys.executable, "-c", textwrap.dedent(f"""
            import socket
            s = socket.create_server(("{addrs[0]}", 7001)); c, peer = s.accept()
            c.sendall(("hello " + peer[0]).encode())
        """)])
        client = f"""
import socket, time
for _ in range(100):
    try:
        s = socket.create_connection(("{addrs[0]}", 7001)); break
    except ConnectionRefusedError:
        time.sleep(0.05)
print(s.recv(100).decode())
"""
        out = c.run(2, [sys.executable, "-c", client], timeout=30).stdout.strip()
        assert server.wait(timeout=30) == 0
        assert out == f"hello {addrs[2]}"
    assert not (_ours(c) & _netns())


def test_rate_is_applied():
    with tb.Cluster(2, rate="1gbit") as c:
        for i in range(2):
            qd = c.run(i, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
            assert "tbf" in qd and "rate 1Gbit" in qd, qd


def test_delay_is_applied():
    try:
        c = tb.Cluster(2, delay="2ms").__enter__()
    except tb.ClusterError as e:
        assert "netem" in str(e)  # the error says what is missing
        pytest.skip(f"no delay on this kernel: {e}")
    try:
        assert "delay 2ms" in c.run(0, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        # The delay is real: a ping-pong over TCP takes at least two one-way delays.
        prog = textwrap.dedent(f"""
            import socket, sys, time
            if sys.argv[1] == "srv":
                s = socket.create_server(("{c.hosts[1].addr}", 7002)); c, _ = s.accept()
                for _ in range(5): c.sendall(c.recv(1))
            else:
                for _ in range(100):
                    try:
                        s = socket.create_connection(("{c.hosts[1].addr}", 7002)); break
                    except ConnectionRefusedError:
                        time.sleep(0.05)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                best = 1.0
                for _ in range(5):
                    t = time.perf_counter(); s.sendall(b"x"); s.recv(1); best = min(best, time.perf_counter() - t)
                print(best)
        """)
        srv = c.popen(1, [sys.executable, "-c", prog, "srv"])
        rtt = float(c.run(0, [sys.executable, "-c", prog, "cli"], timeout=30).stdout)
        srv.wait(timeout=30)
        assert rtt >= 0.004
    finally:
        c.down()


@pytest.mark.parametrize("bad, match", [
    (dict(hosts=0), "1 to 250 hosts"),
    (dict(rate="fast"), "not a tc rate"),
    (dict(delay="2 ms"), "not a tc time"),
])
def test_bad_arguments_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        tb.Cluster(**bad)


def test_rate_units():
    assert tb.rate_bytes_per_s("10gbit") == 1.25e9
    assert tb.rate_bytes_per_s("800mbps") == 8e8
    assert tb.rate_bytes_per_s("500kbit") == 62500


def test_torn_down_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with tb.Cluster(2) as c:
            names = _ours(c)
            assert names <= _netns()
            raise RuntimeError("boom")
    assert not (names & _netns())


def test_processes_on_hosts_are_killed_at_teardown():
    with tb.Cluster(1) as c:
        p = c.popen(0, [sys.executable, "-c", "import time; time.sleep(600)"])
        time.sleep(0.3)
    assert p.wait(timeout=10) != 0


def test_sigterm_and_sigkill_leave_nothing_behind(tmp_path):
    """SIGTERM: the owner tears down. SIGKILL: the next test bed removes the orphans."""
    prog = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from dtrain.testing.cluster import Cluster
        c = Cluster(2).__enter__()
        print(" ".join([h.netns for h in c.hosts] + [c.switch]), flush=True)
        time.sleep(600)
    """)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE, text=True)
        names = set(p.stdout.readline().split())
        assert len(names) == 3 and names <= _netns()
        p.send_signal(sig)
        p.wait(timeout=30)
        if sig == signal.SIGKILL:
            assert names <= _netns()  # nobody could clean up ...
            with tb.Cluster(1):
                pass                  # ... until the next test bed starts
        assert not (names & _netns()), f"left behind after {sig.name}"


# ------------------------------------------------------------ the native backend across hosts

_JOB = textwrap.dedent("""
    import json, os, sys, torch, dtrain
    dtrain.init(timeout=30)
    r, n = dtrain.rank(), dtrain.world_size()
    world = dtrain.comm.group.current().world
    native = dtrain.comm.group.current().default._native
    out = {"transports": {j: world.transport_to(j) for j in range(n) if j != r},
           "hierarchical_layout": native.hierarchical_layout}
    for hierarchy, count, comp in [(h, c, z) for h in ("flat", "hierarchical") for c in (0, 1, 7, 100003, 2359301)
                                   for z in (None, "fp16")]:
            native.hierarchy = hierarchy
            t = (torch.arange(count) % 1000).float() * 0.01 + r  # within fp16's range when summed
            dtrain.allreduce(t, compression=comp)
            ref = (torch.arange(count) % 1000).double() * 0.01 * n + sum(range(n))
            # fp32: n float32 roundings; fp16 wire: 11-bit mantissa, rounded at each of n hops.
            rel = 4 * n * 2.0 ** -24 if comp is None else 2 * n * 2.0 ** -11
            err = (t.double() - ref).abs().max().item() if count else 0.0
            assert t.numel() == count and err <= rel * (1 + ref.abs().max().item() if count else 1), (count, comp, err)
    b = torch.full((5,), float(r))
    dtrain.broadcast(b, root=n - 1)
    assert b.tolist() == [float(n - 1)] * 5
    g = dtrain.allgather(torch.full((r + 1,), float(r)))
    assert g.tolist() == [float(k) for k in range(n) for _ in range(k + 1)]
    if r == 0:
        json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.mark.parametrize("hosts, per_host", [(2, 1), (2, 2), (3, 1)])
def test_collectives_across_hosts(tmp_path, hosts, per_host):
    """Ranks on one host share memory, ranks on different hosts talk TCP, and the sums are right,
    through the flat ring and (with 2 ranks per host) the hierarchical allreduce, whose 9 MiB case
    runs in pipelined chunks."""
    job = tmp_path / "job.py"
    job.write_text(_JOB)
    n = hosts * per_host
    out = tmp_path / "out.json"
    with tb.Cluster(hosts, rate="1gbit") as c:
        env = dict(os.environ, PYTHONPATH=REPO, DTRAIN_WORLD_SIZE=str(n), DTRAIN_MASTER_ADDR=c.hosts[0].addr,
                   DTRAIN_MASTER_PORT="29411", DTRAIN_JOB_TOKEN=secrets.token_hex(8))
        env.pop("DTRAIN_STORE_FD", None)
        procs = []
        for r in range(n):
            h = r // per_host
            e = dict(env, DTRAIN_RANK=str(r), DTRAIN_LOCAL_RANK=str(r % per_host), DTRAIN_LOCAL_SIZE=str(per_host),
                     DTRAIN_HOST_ID=c.hosts[h].netns)
            procs.append(c.popen(h, [sys.executable, str(job), str(out)], env=e,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * n, "\n".join(logs)
    got = json.loads(out.read_text())
    expect = {str(j): ("shm" if j // per_host == 0 else "tcp") for j in range(1, n)}
    assert got["transports"] == expect
    assert got["hierarchical_layout"] == (per_host > 1)


# ------------------------------------------------------------ one dtrain-run per node

def _node_launchers(c, tmp_path, script, hosts, per_host, *args, env_extra=None):
    """`dtrain-run --nnodes/--node-rank` started on every host of the test bed."""
    env = dict(os.environ, PYTHONPATH=REPO, DTRAIN_JOB_TOKEN=secrets.token_hex(8), **(env_extra or {}))
    for k in ("DTRAIN_STORE_FD", "DTRAIN_HOST_ID", "DTRAIN_RANK"):
        env.pop(k, None)
    port = str(20000 + secrets.randbelow(20000))
    return [c.popen(h, [sys.executable, "-m", "dtrain.launch", "--nnodes", str(hosts), "--node-rank", str(h),
                        "--master-addr", c.hosts[0].addr, "--master-port", port, "-n", str(per_host),
                        str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for h in range(hosts)]


@pytest.mark.parametrize("hosts, per_host", [(2, 2), (3, 1)])
def test_one_launcher_per_node(tmp_path, hosts, per_host):
    """Each node's launcher starts its share of the ranks; together they form one world whose
    ranks share memory within a node and talk TCP across nodes."""
    job = tmp_path / "job.py"
    job.write_text(_JOB + "print('rank', r, 'of', n, 'local', os.environ['DTRAIN_LOCAL_RANK'], flush=True)\n")
    out = tmp_path / "out.json"
    n = hosts * per_host
    with tb.Cluster(hosts, rate="1gbit") as c:
        launchers = _node_launchers(c, tmp_path, job, hosts, per_host, str(out))
        logs = [p.communicate(timeout=120)[0] for p in launchers]
        assert [p.returncode for p in launchers] == [0] * hosts, "\n".join(logs)
    transports = json.loads(out.read_text())["transports"]
    assert transports == {str(j): ("shm" if j // per_host == 0 else "tcp") for j in range(1, n)}
    for h, log in enumerate(logs):
        for k in range(per_host):
            r = h * per_host + k
            assert f"[node{h}:{r}] rank {r} of {n} local {k}" in log, log


def test_a_rank_killed_on_one_node_stops_every_node(tmp_path):
    """SIGKILL of rank 3 (on host 1) mid-training: both launchers exit non-zero within 20 s, and
    node 0's ranks say which rank is gone."""
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent("""
        import os, signal, sys, time, torch, dtrain
        dtrain.init(timeout=30)
        r = dtrain.rank()
        t = torch.ones(10000)
        for step in range(100000):
            dtrain.allreduce(t)
            t.fill_(1.0)
            if step == 20:
                print("steady", flush=True)
                if r == 3:
                    time.sleep(1)
                    print("killing myself", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.01)
    """))
    with tb.Cluster(2) as c:
        launchers = _node_launchers(c, tmp_path, job, 2, 2)
        start = time.monotonic()
        codes = [p.wait(timeout=90) for p in launchers]
        took = time.monotonic() - start
        logs = [p.stdout.read() for p in launchers]
    assert all(code != 0 for code in codes), (codes, logs)
    assert "killing myself" in logs[1], logs[1]
    # killed ~1 s after step 20 (about 0.5 s in); the job must be gone well within 20 s of that
    assert took < 25, f"the job took {took:.1f} s to stop after a rank died"
    assert "rank 3" in logs[0] and "failed" in logs[0], logs[0]
    assert "rank 3 on node 1 failed (killed by SIGKILL)" in logs[1], logs[1]


# ------------------------------------------------------------ dtrain-run -H / --hostfile from here

def _from_here(c, tmp_path, hosts_args, script, *args, timeout=120):
    agent = tb.remote_shell_agent(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO)
    for k in ("DTRAIN_STORE_FD", "DTRAIN_HOST_ID", "DTRAIN_RANK", "DTRAIN_JOB_TOKEN"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "dtrain.launch", *hosts_args, "--remote-shell", str(agent), "--master-addr",
           c.hosts[0].addr, "--master-port", str(20000 + secrets.randbelow(20000)), str(script), *args]
    start = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(tmp_path))
    return p, time.monotonic() - start


@pytest.mark.parametrize("form", ["-H", "--hostfile"])
def test_hosts_started_from_one_launcher(tmp_path, form):
    """-H ns0:2,ns1:1 (or the same as an Open MPI hostfile): node launchers started through the
    remote shell form a world of 3 with unequal hosts, and the collectives are right."""
    job = tmp_path / "job.py"
    job.write_text(_JOB + "print('rank', r, 'of', n, 'local', os.environ['DTRAIN_LOCAL_RANK'], flush=True)\n")
    out = tmp_path / "out.json"
    with tb.Cluster(2) as c:
        slots = [2, 1]
        if form == "-H":
            args = ["-H", ",".join(f"{h.netns}:{s}" for h, s in zip(c.hosts, slots))]
        else:
            (tmp_path / "hostfile").write_text("".join(f"{h.netns} slots={s}\n" for h, s in zip(c.hosts, slots)))
            args = ["--hostfile", str(tmp_path / "hostfile")]
        p, _ = _from_here(c, tmp_path, args, job, str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(out.read_text())["transports"] == {"1": "shm", "2": "tcp"}
    for tag, line in (("[node0:0]", "rank 0 of 3 local 0"), ("[node0:1]", "rank 1 of 3 local 1"),
                      ("[node1:2]", "rank 2 of 3 local 0")):
        assert f"{tag} {line}" in p.stdout, p.stdout


def test_hosts_job_stops_everywhere_when_a_rank_dies(tmp_path):
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent("""
        import os, signal, time, torch, dtrain
        dtrain.init(timeout=30)
        t = torch.ones(1000)
        for step in range(100000):
            dtrain.allreduce(t)
            if step == 20 and dtrain.rank() == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.01)
    """))
    with tb.Cluster(2) as c:
        p, took = _from_here(c, tmp_path, ["-H", ",".join(f"{h.netns}:2" for h in c.hosts)], job, timeout=90)
    assert p.returncode != 0
    assert took < 25, f"the job took {took:.1f} s to stop after a rank died"
    assert "rank 3 on node 1 failed (killed by SIGKILL)" in p.stderr, p.stderr
    assert "the job is stopped on every host" in p.stderr, p.stderr


def test_hosts_job_restarts_every_host_and_resumes(tmp_path):
    """-H with --max-restarts 1: rank 1 (host 2) dies after step 5's checkpoint; both hosts
    start again and resume from it at step 6."""
    from .test_launcher import _RESUMABLE
    job = tmp_path / "job.py"
    job.write_text(_RESUMABLE)
    with tb.Cluster(2) as c:
        p, _ = _from_here(c, tmp_path, ["-H", ",".join(f"{h.netns}:1" for h in c.hosts), "--max-restarts", "1"],
                          job, str(tmp_path / "ckpt.pt"), "crash")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "starting every host again (restart 1 of 1)" in p.stderr, p.stderr
    assert "[node0:0] attempt 1 starts at step 6" in p.stdout and "[node1:1] attempt 1 starts at step 6" in p.stdout
    assert len({line.split()[-1] for line in p.stdout.splitlines() if " final " in line}) == 1
