"""Failure behaviour with real processes: dead ranks, late ranks, mismatched calls, bad tokens."""

import re

import pytest

from tests.multiproc import workers
from tests.multiproc.harness import ranks, script

HEADER = """
import os, socket, sys, time, torch, dtrain
"""


def _kill_mid_allreduce(tmp_path, n, victim, setup=""):
    """n ranks allreduce 64 MiB; `victim` dies (SIGKILL) with one in flight. Returns
    (rc, out, err, launcher seconds, the lines where a rank caught the CommError)."""
    rc, out, err, secs = script(tmp_path, HEADER + setup + f"""
dtrain.init(timeout=60)
big = torch.ones(16 << 20)
if dtrain.rank() == {victim}:
    work = dtrain.allreduce(big, async_op=True)   # in flight, then this rank dies
    time.sleep(0.05)
    os.kill(os.getpid(), 9)
start = time.monotonic()
try:
    dtrain.allreduce(big)
    dtrain.allreduce(big)
    print("NO ERROR")
except dtrain.CommError as e:
    print(f"CAUGHT {{type(e).__name__}} after {{time.monotonic() - start:.1f}}s: {{e}}")
    sys.exit(3)
""", n, "--grace", "5")
    caught = [line for line in out.splitlines() if "CAUGHT" in line]
    assert caught, out + err
    return rc, out, err, secs, caught


@pytest.mark.timeout(60)
def test_dead_rank_mid_collective_named_within_10s_and_launcher_exits_within_15s(tmp_path):
    rc, out, err, secs, caught = _kill_mid_allreduce(tmp_path, 3, 1)
    assert rc != 0
    assert secs < 15, secs
    for line in caught:
        assert "rank 1" in line, line
        assert float(re.search(r"after ([0-9.]+)s", line).group(1)) < 10
    assert "rank 1 failed (killed by SIGKILL)" in err or "failed" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_peer_that_exits_right_after_its_last_send_is_not_a_failure(transport):
    # Rank 1 sleeps (SIGSTOP) through rank 0's broadcast and exit, then finds the bytes and a
    # dead peer: it must take the bytes. (CI once failed a 3-rank job on 2 cores this way.)
    assert ranks(workers.last_bytes_then_exit, 2, env={"DTRAIN_TRANSPORT": transport}, timeout=40) == \
        [None, [0.0, 1.0, 2.0, 3.0]]


@pytest.mark.timeout(60)
def test_rank_that_never_arrives_times_out_naming_op_size_and_rank(tmp_path):
    rc, out, err, secs = script(tmp_path, HEADER + """
dtrain.init(timeout=2)
if dtrain.rank() == 2:
    time.sleep(20)
    sys.exit(0)
start = time.monotonic()
try:
    dtrain.allreduce(torch.ones(1000))
except dtrain.CommTimeout as e:
    print(f"TIMEOUT after {time.monotonic() - start:.1f}s: {e}")
    sys.exit(4)
""", 3, "--grace", "1")
    lines = [line for line in out.splitlines() if "TIMEOUT" in line]
    assert lines, out + err
    first = lines[0]
    assert "allreduce" in first and "4000 bytes" in first and "2 (last entered call" in first, first
    assert float(re.search(r"after ([0-9.]+)s", first).group(1)) < 6
    assert rc != 0  # 4 from a rank that timed out, 1 from one that saw its abort first


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["size", "dtype", "op"])
def test_mismatched_calls_raise_quoting_both_sides(tmp_path, world, kind):
    rc, out, err, secs = script(tmp_path, HEADER + f"""
dtrain.init(timeout=20)
odd = dtrain.rank() == 1
kind = {kind!r}
t = torch.ones(12 if (odd and kind == "size") else 10, dtype=torch.float64 if (odd and kind == "dtype") else torch.float32)
try:
    dtrain.allreduce(t, op="max" if (odd and kind == "op") else "sum")
    print("NO ERROR")
except dtrain.CommError as e:
    print(f"MISMATCH {{e}}")
""", world)
    assert secs < 20
    lines = [line for line in out.splitlines() if "MISMATCH" in line]
    assert len(lines) == world, out + err
    quoted = {"size": ("count=10", "count=12"), "dtype": ("float32", "float64"), "op": ("op=sum", "op=max")}[kind]
    assert any(all(q in line for q in quoted) for line in lines), lines


@pytest.mark.timeout(60)
def test_connection_without_the_token_is_refused_and_the_job_goes_on(tmp_path):
    rc, out, err, secs = script(tmp_path, HEADER + """
dtrain.init(timeout=20)
if dtrain.rank() == 0:
    s = socket.create_connection(("127.0.0.1", int(os.environ["DTRAIN_MASTER_PORT"])))
    hello = s.recv(40)
    assert hello[:4] == b"DTRN"
    s.sendall(os.urandom(64))            # a nonce and a proof made without the token
    assert s.recv(32) == b""             # refused: the server closes without proving itself
    s.close()
    time.sleep(0.2)
    print("REFUSED", dtrain.comm.group.current().world.refused_connections)
dtrain.barrier()
t = dtrain.allreduce(torch.ones(3))
print("RESULT", t.tolist())
""", 2)
    assert rc == 0, out + err
    assert "REFUSED 1" in out
    assert out.count("RESULT [2.0, 2.0, 2.0]") == 2
    assert "refused a rendezvous connection" in err and "DTRAIN_JOB_TOKEN" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", [1, 2])
def test_dead_rank_mid_hierarchical_allreduce_is_named_on_every_host(tmp_path, victim):
    """2 fake hosts x 2 ranks; the pipelined hierarchical path (two threads per rank) still fails
    fast, naming the rank that died, whether it shared this rank's host (shm) or not (TCP)."""
    rc, out, err, secs, caught = _kill_mid_allreduce(tmp_path, 4, victim, setup="""
os.environ["DTRAIN_HOST_ID"] = "fakehost" + str(int(os.environ["DTRAIN_RANK"]) // 2)
dtrain.init(timeout=60)
assert dtrain.comm.group.current().default._native.hierarchical_layout
warm = torch.ones(16 << 20)
dtrain.allreduce(warm)
assert warm[0].item() == 4.0
""")
    assert rc != 0
    assert secs < 30, secs
    assert "NO ERROR" not in out
    for line in caught:
        assert f"rank {victim}" in line, line
        assert float(re.search(r"after ([0-9.]+)s", line).group(1)) < 10
