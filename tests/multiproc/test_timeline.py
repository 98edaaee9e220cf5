"""The timeline (Chrome trace) and the stall inspector, on real ranks."""

import json

import pytest

from tests.multiproc import timeline_workers as tw
from tests.multiproc.harness import ranks, script

STEPS = 4


def spans(trace, pid, name_prefix, row=None):
    return [e for e in trace if e.get("ph") == "X" and e["pid"] == pid and e["name"].startswith(name_prefix)
            and (row is None or e["tid"] == row)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("compression", [None, "fp16"])
def test_trace_has_every_phase_and_bucket_per_rank(tmp_path, world, compression):
    path = tmp_path / "trace.json"
    out = ranks(tw.traced_steps, world, str(path), STEPS, compression, 0.25,
                env={"DTRAIN_SHM_COMPRESSION": "1"} if compression else None)
    assert len({round(c, 6) for _, _, c in out}) == 1, "ranks ended with different parameters"
    trace = json.load(open(path))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in trace if e["name"] == "process_name"}
    assert names == {r: f"rank {r}" for r in range(world)}
    for r in range(world):
        for phase in ("forward", "backward", "optimizer step", "wait for reduction", "unpack"):
            assert len(spans(trace, r, phase, "compute")) == STEPS, (r, phase)
        transfers = spans(trace, r, "allreduce bucket", "comm")
        # 13 layers of 256x256 (+ the head) in 0.25 MiB buckets: several buckets per step
        per_step = len(transfers) // STEPS
        assert per_step >= 3 and len(transfers) == per_step * STEPS
        wires = {e["args"]["wire"] for e in transfers}
        assert wires <= ({"float32"} if compression is None else {"float32", "fp16"})
        if compression:  # the first step learns the fp16 scale in float32, the rest go in fp16
            assert "fp16" in wires
        # Overlap, the point of bucketing: in some step a bucket's transfer started before
        # that step's backward ended.
        backward = sorted(spans(trace, r, "backward"), key=lambda e: e["ts"])
        overlapped = 0
        for b in backward:
            end = b["ts"] + b["dur"]
            overlapped += any(b["ts"] <= t["ts"] < end for t in transfers)
        assert overlapped >= 1, "no transfer overlapped backward in any step"
        # forward precedes backward precedes the wait within a step
        fwd = sorted(spans(trace, r, "forward"), key=lambda e: e["ts"])
        wait = sorted(spans(trace, r, "wait for reduction"), key=lambda e: e["ts"])
        for f, b, w in zip(fwd, backward, wait):
            assert f["ts"] <= b["ts"] <= w["ts"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_stats_split_and_bytes(world, tmp_path):
    out = ranks(tw.traced_steps, world, str(tmp_path / "t.json"), STEPS, None, 0.25)
    n_params = sum(p.numel() for p in tw.model().parameters())
    for stats, sec, _ in out:
        assert stats["steps"] == STEPS
        # ring allreduce: each rank sends 2(n-1)/n of every float32 gradient byte per step
        assert stats["wire_bytes"] == pytest.approx(STEPS * n_params * 4 * 2 * (world - 1) / world)
        assert 0 < stats["blocked_s"] < STEPS * sec
        assert 0 < stats["comm_s"]
        assert stats["unpack_s"] > 0


def late_rank_1(tmp_path, steps, sleep_s, stall_s):
    """2 ranks of traced_steps with rank 1 sleeping before its last backward; returns stderr."""
    body = f"""
        from tests.multiproc import timeline_workers as tw
        if __name__ == "__main__":
            tw.traced_steps(None, {steps}, None, 25, sleep_rank=1, sleep_s={sleep_s})
    """
    rc, out, err, _ = script(tmp_path, body, 2, env={"DTRAIN_STALL_WARNING_S": str(stall_s)})
    assert rc == 0, err
    return err


@pytest.mark.timeout(120)
def test_stall_warning_names_the_late_rank_and_tensors(tmp_path):
    err = late_rank_1(tmp_path, 3, 3.0, 1)
    lines = [l for l in err.splitlines() if "stall:" in l]
    assert lines, err
    first = lines[0]
    assert "[rank 0]" in first and "rank(s) 1 (last entered call #" in first and "have not arrived" in first
    assert "12.bias" in first or "12.weight" in first  # the last layer's gradients go first
    assert not any("[rank 1] stall" in l for l in lines)  # the late rank itself never waited


@pytest.mark.timeout(120)
def test_no_stall_warning_when_off(tmp_path):
    assert "stall:" not in late_rank_1(tmp_path, 2, 1.5, 0)


@pytest.mark.timeout(120)
def test_timeline_from_environment(tmp_path):
    body = """
        import torch, dtrain
        if __name__ == "__main__":
            dtrain.init()
            m = torch.nn.Linear(4, 2)
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            m, opt = dtrain.AllReduceStrategy().prepare(m, opt)
            for _ in range(2):
                opt.zero_grad(); m(torch.randn(3, 4)).sum().backward(); opt.step()
            dtrain.shutdown()
    """
    rc, out, err, _ = script(tmp_path, body, 2, env={"DTRAIN_TIMELINE": str(tmp_path / "env.json")})
    assert rc == 0, err
    trace = json.load(open(tmp_path / "env.json"))["traceEvents"]
    assert {e["pid"] for e in trace if e.get("ph") == "X"} == {0, 1}
    assert len([e for e in trace if e["name"] == "forward"]) == 4
