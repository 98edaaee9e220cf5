"""The parameter server's wire protocol against a real server (dtrain._C.ps.Server, its own
C++ threads and a real TCP socket) in this process: hand-made malformed messages are rejected
and never applied, and real clients see exact SGD and the staleness clock."""

import json
import socket
import struct
import threading
import time

import pytest
import torch

from dtrain import _C
from dtrain.errors import CommError, RendezvousError

TOKEN = "unit-test-token"
HDR = struct.Struct("<IHHiIQQQQ")  # magic, version, type, worker, aux, clock, offset, count, bytes
MAGIC, VERSION = 0x53505444, 1
HELLO, WELCOME, PUSHPULL, PULL, PARAMS, CONTROL, REPLY, STATS, DONE, ERROR = range(1, 11)
F32 = 0
N, LR, LAYOUT = 10, 0.5, 1234


def header(type_, worker=0, aux=0, clock=0, offset=0, count=0, nbytes=0, magic=MAGIC, version=VERSION):
    return HDR.pack(magic, version, type_, worker, aux, clock, offset, count, nbytes)


@pytest.fixture
def server(request):
    staleness, workers = getattr(request, "param", (-1, 1))
    params = torch.arange(N, dtype=torch.float32)
    s = _C.ps.Server(token=TOKEN, optimizer="sgd", num_workers=workers, num_groups=1, first_worker_rank=1, rank=0,
                     staleness=staleness, timeout=5.0, layout_hash=LAYOUT, bind_host="127.0.0.1",
                     groups=[dict(begin=0, end=N, group=0, lr=LR, weight_decay=0.0)], params=params.data_ptr(),
                     count=N)
    yield s
    s.stop()


def client(server, worker=0):
    return _C.ps.Client(token=TOKEN, worker=worker, rank=1 + worker, hosts=["127.0.0.1"], ports=[server.port],
                        server_ranks=[0], bounds=[0, N], layout_hash=LAYOUT, num_groups=1, timeout=5.0)


def raw(server):
    fd = _C.ps.connect_raw("127.0.0.1", server.port, TOKEN)
    s = socket.socket(fileno=fd)
    s.settimeout(5)
    return s


def read_reply(s):
    """(type, header fields, payload) of the server's next message, or None once it closed."""
    head = b""
    while len(head) < HDR.size:
        chunk = s.recv(HDR.size - len(head))
        if not chunk:
            return None
        head += chunk
    f = HDR.unpack(head)
    body = b""
    while len(body) < f[8]:
        chunk = s.recv(f[8] - len(body))
        if not chunk:
            break
        body += chunk
    return f[2], f, body


def closed(s):
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def rejected(server):
    return json.loads(server.stats_json())["rejected"]


def hello(s, worker=0):
    s.sendall(header(HELLO, worker, aux=1, clock=LAYOUT, count=N))
    t, f, _ = read_reply(s)
    assert t == WELCOME
    return f[5]


def current(server):
    c = client(server)
    out = torch.empty(N)
    c.pull(out.data_ptr())
    c.done()
    return out


@pytest.mark.timeout(60)
def test_malformed_and_unauthenticated_messages_are_rejected_and_never_applied(server):
    # 1. the wrong job token: the handshake fails on both sides
    with pytest.raises(RendezvousError, match="token"):
        _C.ps.connect_raw("127.0.0.1", server.port, "another-job")
    # 2. no handshake at all: bytes that are not a proof
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
        s.settimeout(5)
        assert s.recv(40)[:4] == b"DTRN"  # the server's challenge, then it hangs up
        assert closed(s)
    cases = [
        (header(HELLO, magic=0xDEADBEEF), "bad magic"),
        (header(HELLO, version=2, count=N, clock=LAYOUT, aux=1), "protocol version 2"),
        (header(77), "unknown message type 77"),
        (header(PUSHPULL, count=N, nbytes=4 * N + 8), "the first message must be Hello"),
        (header(HELLO, worker=5, aux=1, clock=LAYOUT, count=N), "outside 0..0"),
        (header(HELLO, aux=1, clock=LAYOUT, count=N + 1), "does not match"),
        (header(HELLO, aux=1, clock=LAYOUT + 1, count=N), "does not match"),
    ]
    for msg, why in cases:
        before = rejected(server)
        s = raw(server)
        s.sendall(msg)
        t, _, text = read_reply(s)
        assert t == ERROR and why in text.decode(), (why, text)
        assert closed(s)
        s.close()
        assert rejected(server) == before + 1
    # 3. a sound Hello, then pushes that lie about their sizes, dtype, step or learning rate
    lr = struct.pack("<d", LR)
    grad = struct.pack(f"<{N}f", *([1.0] * N))
    bad_pushes = [
        (header(PUSHPULL, aux=F32, count=N, nbytes=4 * N), grad, "payload bytes"),          # no learning rate
        (header(PUSHPULL, aux=F32, count=N - 1, nbytes=4 * N - 4 + 8), grad, "payload bytes"),
        (header(PUSHPULL, aux=F32, offset=1, count=N, nbytes=4 * N + 8), grad, "payload bytes"),
        (header(PUSHPULL, aux=4, count=N, nbytes=4 * N + 8), grad, "dtype code 4"),          # int32
        (header(PUSHPULL, aux=F32, clock=3, count=N, nbytes=4 * N + 8), grad + lr, "step 3"),
        (header(PUSHPULL, aux=F32, count=N, nbytes=4 * N + 8), grad + struct.pack("<d", float("nan")), "nan"),
        (header(PUSHPULL, worker=1, aux=F32, count=N, nbytes=4 * N + 8), grad + lr, "claims worker 1"),
        (header(WELCOME), b"", "may not send Welcome"),
    ]
    for msg, body, why in bad_pushes:
        s = raw(server)
        hello(s)
        s.sendall(msg + body)
        t, _, text = read_reply(s)
        assert t == ERROR and why in text.decode(), (why, text)
        assert closed(s)
        s.close()
    # 4. a truncated push: the header promises more than arrives before the connection closes
    s = raw(server)
    hello(s)
    s.sendall(header(PUSHPULL, aux=F32, count=N, nbytes=4 * N + 8) + grad[:13])
    s.close()
    time.sleep(0.2)
    # nothing of all that reached the parameters, and a real worker still trains
    assert torch.equal(current(server), torch.arange(N, dtype=torch.float32))
    c = client(server)
    g, fresh = torch.ones(N), torch.empty(N)
    c.start(g.data_ptr(), fresh.data_ptr(), [LR], _C.DType.float32)
    x = c.wait()
    assert torch.equal(fresh, torch.arange(N, dtype=torch.float32) - LR), fresh
    assert x.step == c.step and x.applied == 1
    c.done()
    stats = json.loads(server.stats_json())
    assert stats["pushes"] == 1 and stats["updates_applied"] == 1
    assert stats["rejected"] == 2 + len(cases) + len(bad_pushes), stats


@pytest.mark.timeout(30)
def test_a_second_connection_for_a_connected_worker_is_refused(server):
    c = client(server)
    with pytest.raises(CommError, match="Welcome|closed|lost"):
        client(server)  # the same worker index while the first is connected
    g, fresh = torch.ones(N), torch.empty(N)
    c.start(g.data_ptr(), fresh.data_ptr(), [LR], _C.DType.float32)
    c.wait()  # the first connection still works
    c.done()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_half_precision_pushes_apply_the_rounded_gradient(server, wire):
    c = client(server)
    g = torch.linspace(-3.3, 7.7, N)
    fresh = torch.empty(N)
    c.start(g.data_ptr(), fresh.data_ptr(), [LR], getattr(_C.DType, wire))
    c.wait()
    rounded = g.to(getattr(torch, wire)).float()
    assert torch.equal(fresh, torch.arange(N, dtype=torch.float32) - LR * rounded)
    c.done()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("server", [(0, 2)], indirect=True)
def test_staleness_zero_averages_both_workers_into_one_step(server):
    a, b = client(server, 0), client(server, 1)
    ga, gb = torch.full((N,), 1.0), torch.full((N,), 3.0)
    fa, fb = torch.empty(N), torch.empty(N)
    a.start(ga.data_ptr(), fa.data_ptr(), [LR], _C.DType.float32)
    time.sleep(0.2)
    b.start(gb.data_ptr(), fb.data_ptr(), [LR], _C.DType.float32)
    xa, xb = a.wait(), b.wait()
    want = torch.arange(N, dtype=torch.float32) - LR * 2.0
    assert torch.equal(fa, want) and torch.equal(fb, want)
    assert xa.applied == xb.applied == 1
    a.done(), b.done()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("server", [(1, 2)], indirect=True)
def test_a_worker_two_steps_ahead_waits_for_the_slow_one(server):
    """staleness=1: worker 0's second push is answered only once worker 1 has pushed once."""
    a, b = client(server, 0), client(server, 1)
    g, fa, fb = torch.ones(N), torch.empty(N), torch.empty(N)
    a.start(g.data_ptr(), fa.data_ptr(), [LR], _C.DType.float32)
    assert a.wait().lead == 1
    a.start(g.data_ptr(), fa.data_ptr(), [LR], _C.DType.float32)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (a.wait(), done.set()))
    waiter.start()
    assert not done.wait(0.5), "worker 0 ran 2 steps ahead with staleness=1"
    b.start(g.data_ptr(), fb.data_ptr(), [LR], _C.DType.float32)
    b.wait()
    assert done.wait(5), "worker 0 was not released when worker 1 caught up"
    waiter.join()
    stats = json.loads(server.stats_json())
    assert stats["max_lead"] == 1 and stats["updates_applied"] == 3
    a.done(), b.done()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("server", [(1, 2)], indirect=True)
def test_a_worker_waiting_on_a_stuck_peer_gets_an_error_naming_it(server):
    """Worker 1 connects but never pushes: worker 0's second step fails after the server's
    timeout (5 s here) with an error naming rank 2, instead of hanging."""
    a, b = client(server, 0), client(server, 1)
    g, fa = torch.ones(N), torch.empty(N)
    a.start(g.data_ptr(), fa.data_ptr(), [LR], _C.DType.float32)
    a.wait()
    a.start(g.data_ptr(), fa.data_ptr(), [LR], _C.DType.float32)
    t0 = time.monotonic()
    with pytest.raises(CommError, match=r"worker rank\(s\) 2 \(at step 0\)"):
        a.wait()
    assert 4 < time.monotonic() - t0 < 10
    b.done()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("server", [(1, 2)], indirect=True)
def test_a_lost_worker_releases_the_clock_and_may_rejoin(server):
    a, b = client(server, 0), client(server, 1)
    g, fa, fb = torch.ones(N), torch.empty(N), torch.empty(N)
    for _ in range(1):
        a.start(g.data_ptr(), fa.data_ptr(), [LR], _C.DType.float32)
        a.wait()
    a.start(g.data_ptr(), fa.data_ptr(), [LR], _C.DType.float32)  # waits for worker 1 ...
    time.sleep(0.3)
    del b  # ... which disconnects without Done: dropped, so worker 0 goes on
    a.wait()
    stats = json.loads(server.stats_json())
    assert [w["state"] for w in stats["workers"]] == ["live", "lost"]
    b = client(server, 1)  # restarted: rejoins at the slowest live worker's step
    assert b.step == 2
    b.pull(fb.data_ptr())
    assert torch.equal(fb, torch.arange(N, dtype=torch.float32) - 2 * LR)
    assert json.loads(server.stats_json())["workers"][1]["rejoins"] == 1
    a.done(), b.done()
