"""dtrain.timeline without processes: settings, errors and the single-process file."""

import json

import pytest

from dtrain import timeline
from dtrain.errors import ConfigError


def test_stall_seconds_default_and_env(monkeypatch):
    monkeypatch.delenv("DTRAIN_STALL_WARNING_S", raising=False)
    assert timeline.stall_seconds() == 60.0
    monkeypatch.setenv("DTRAIN_STALL_WARNING_S", "2.5")
    assert timeline.stall_seconds() == 2.5
    monkeypatch.setenv("DTRAIN_STALL_WARNING_S", "0")
    assert timeline.stall_seconds() == 0.0


@pytest.mark.parametrize("bad", ["soon", "-1"])
def test_stall_seconds_rejects_bad_values(monkeypatch, bad):
    monkeypatch.setenv("DTRAIN_STALL_WARNING_S", bad)
    with pytest.raises(ConfigError, match="DTRAIN_STALL_WARNING_S.*" + bad):
        timeline.stall_seconds()


def test_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        timeline.Timeline(str(tmp_path / "nope" / "trace.json"))


def test_one_process_trace_is_valid_chrome_json(tmp_path):
    path = tmp_path / "t.json"
    t = timeline.Timeline(str(path))
    a = timeline.now()
    t.span("forward", "step", a, a + 0.002)
    t.span("allreduce bucket 0", "reduce", a + 0.001, a + 0.003, row="comm", args={"elements": 7})
    assert t.close() == str(path)
    assert t.close() is None  # once
    events = json.load(open(path))["traceEvents"]
    xs = [e for e in events if e["ph"] == "X"]
    assert [e["name"] for e in xs] == ["forward", "allreduce bucket 0"]
    assert xs[0]["dur"] == pytest.approx(2000, abs=1)
    assert xs[1]["ts"] - xs[0]["ts"] == pytest.approx(1000, abs=1)
    assert xs[1]["tid"] == "comm" and xs[1]["args"] == {"elements": 7}
    assert any(e["name"] == "process_name" and e["args"]["name"] == "rank 0" for e in events)
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind


def test_close_alone_writes_this_rank(tmp_path):
    path = tmp_path / "t.json"
    t = timeline.Timeline(str(path))
    t.span("forward", "step", timeline.now(), timeline.now())
    assert t.close_alone() == str(path)
    assert len([e for e in json.load(open(path))["traceEvents"] if e["ph"] == "X"]) == 1
