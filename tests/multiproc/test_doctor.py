"""`dtrain doctor` on this host and across the namespace test bed: real checks, real failures."""

import os
import re
import secrets
import subprocess
import sys
import time

import pytest

from dtrain.testing import cluster as tb
from tests.multiproc.harness import REPO



def _doctor(*args, timeout=240, **extra):
    env = dict(os.environ, PYTHONPATH=REPO)
    for k in [k for k in env if k.startswith("DTRAIN_")]:
        env.pop(k)
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "dtrain", "doctor", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.timeout(120)
def test_this_host_passes():
    p = _doctor()
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"^ok +2 local ranks +allreduce over shm, busbw \d+\.\d+ GB/s", p.stdout, re.M), p.stdout
    # the compiler that built dtrain._C builds the reader too: found in the cache or compiled now
    found = re.search(r"^ok +tensor reader +in use \((.+\.so)\)", p.stdout, re.M)
    assert found and os.path.exists(found.group(1)), p.stdout
    assert "all checks passed" in p.stdout


@pytest.mark.timeout(120)
def test_the_tensor_reader_row_says_why_it_is_not_used(tmp_path):
    p = _doctor(DTRAIN_TORCH_READER="0")
    assert p.returncode == 0 and re.search(r"^ok +tensor reader +off \(DTRAIN_TORCH_READER=0\)", p.stdout, re.M), \
        p.stdout + p.stderr
    # no compiler: informational, the doctor still passes, and the row names the cause
    p = _doctor(DTRAIN_CACHE_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-c++"),
                PATH=os.path.dirname(sys.executable))
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"^ok +tensor reader +not built \(no C\+\+ compiler", p.stdout, re.M), p.stdout


def test_the_dtrain_command_needs_a_subcommand():
    p = subprocess.run([sys.executable, "-m", "dtrain"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "usage: dtrain doctor" in p.stderr


needs_testbed = pytest.mark.skipif(tb.available() is not None, reason=str(tb.available()))


@pytest.fixture
def agent(tmp_path):
    """The remote shell that reaches a test-bed host: CMD HOST 'COMMAND'."""
    return tb.remote_shell_agent(tmp_path)


@needs_testbed
@pytest.mark.timeout(300)
def test_hosts_pass_and_busbw_is_compared_with_the_link(agent):
    with tb.Cluster(2, rate="1gbit") as c:
        p = _doctor("-H", ",".join(f"{h.netns}:2" for h in c.hosts), "--remote-shell", str(agent), "--master-addr",
                    c.hosts[0].addr, "--master-port", str(20000 + secrets.randbelow(20000)),
                    "--network-interface", "eth0", "--link-rate", "1gbit")
    assert p.returncode == 0, p.stdout + p.stderr
    for h in c.hosts:
        assert re.search(rf"^ok +{h.netns}: interface eth0 +{re.escape(h.addr)}$", p.stdout, re.M), p.stdout
    m = re.search(r"bandwidth between hosts +2 hosts, busbw .* = (\d+)% of the 1 Gbit/s link", p.stdout)
    assert m and 50 <= int(m.group(1)) <= 110, p.stdout  # tbf caps the link at 1 Gbit/s


@needs_testbed
@pytest.mark.timeout(300)
def test_an_unreachable_host_and_a_busy_port_are_named_with_a_fix(agent):
    port = 20000 + secrets.randbelow(20000)
    with tb.Cluster(1) as c:
        holder = c.popen(0, [sys.executable, "-c", f"import socket, time; s = socket.create_server(('', {port})); "
                             "print('up', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "up"
        start = time.monotonic()
        p = _doctor("-H", f"{c.hosts[0].netns}:1,nosuchhost:1", "--remote-shell", str(agent),
                    "--master-port", str(port))
        took = time.monotonic() - start
        holder.kill()
    assert p.returncode == 1, p.stdout + p.stderr
    assert re.search(rf"^BAD +{c.hosts[0].netns}: master port {port} ", p.stdout, re.M), p.stdout
    assert "fix: choose another --master-port" in p.stdout
    assert re.search(r"^BAD +nosuchhost: reachable +.*nosuchhost", p.stdout, re.M), p.stdout
    assert "nosuchhost true` works" in p.stdout
    assert "bandwidth" not in p.stdout  # not measured while something above is broken
    assert "2 problem(s) found" in p.stdout and took < 120
