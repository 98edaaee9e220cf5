"""-H and --hostfile parsing, and the node launchers' command lines (no processes)."""

import shlex

import pytest

from dtrain.errors import DtrainError
from dtrain.launch import hosts as H


def test_hosts_spec():
    assert H.parse_hosts("a:4,b:2,c") == [("a", 4), ("b", 2), ("c", 1)]
    assert H.parse_hosts(" 10.0.0.1:3 , node-2.example.com ") == [("10.0.0.1", 3), ("node-2.example.com", 1)]


@pytest.mark.parametrize("spec, match", [
    ("a:0", "has 0 slots"),
    ("a:-2", "has -2 slots"),
    ("", "names no host"),
    ("a:2,a:2", "names host a twice"),
    ("a b:2", "is not host or host:slots"),
])
def test_bad_hosts_spec_is_named(spec, match):
    with pytest.raises(DtrainError, match=match):
        H.parse_hosts(spec)


def test_hostfile_in_open_mpis_format(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# two nodes\nnode1 slots=4 max_slots=8\n\n  node2   # one slot\nnode3 slots=2\n")
    assert H.parse_hostfile(str(f)) == [("node1", 4), ("node2", 1), ("node3", 2)]


@pytest.mark.parametrize("text, match", [
    ("node1 slots=zero\n", "line 1: slots='zero' must be a positive integer"),
    ("node1\nnode2 4\n", "line 2: '4' is not key=value"),
    ("# nothing\n", "lists no host"),
    ("n1 slots=2\nn1\n", "names host n1 twice"),
])
def test_bad_hostfile_names_the_line(tmp_path, text, match):
    f = tmp_path / "hosts"
    f.write_text(text)
    with pytest.raises(DtrainError, match=match):
        H.parse_hostfile(str(f))
    with pytest.raises(DtrainError, match="No such file"):
        H.parse_hostfile(str(tmp_path / "missing"))


def test_node_commands_number_the_ranks_across_unequal_hosts(monkeypatch):
    monkeypatch.setenv("WANDB_KEY", "k3y")
    argvs = H.node_commands([("a", 3), ("b", 1), ("c", 2)], ["python", "train.py", "--lr", "0.1 x"], "10.0.0.1",
                            29500, "tok", "ssh -p 2222", ["--grace", "2"], ["WANDB_KEY", "UNSET_NAME"])
    assert len(argvs) == 3
    firsts = []
    for k, argv in enumerate(argvs):
        assert argv[:4] == ["ssh", "-p", "2222", "abc"[k]] and len(argv) == 5  # agent, host, one command string
        cd, _, node = argv[4].partition("; exec ")
        assert cd.startswith("cd ")
        words = shlex.split(node)
        assert words[:5] == ["env", "DTRAIN_JOB_TOKEN=tok", "DTRAIN_RESTART_COUNT=0", "WANDB_KEY=k3y", words[4]]
        assert "UNSET_NAME" not in node
        opt = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
        assert (opt["--nnodes"], opt["--node-rank"], opt["--master-addr"], opt["--world-size"]) == \
            ("3", str(k), "10.0.0.1", "6")
        assert words[words.index("-n") + 1] == ["3", "1", "2"][k]
        assert words[-4:] == ["python", "train.py", "--lr", "0.1 x"]  # quoting survives the remote shell
        firsts.append(int(opt["--first-rank"]))
    assert firsts == [0, 3, 4]


def test_the_shipped_hostfile_example_parses():
    import os
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert H.parse_hostfile(os.path.join(repo, "launch", "hostfile.example")) == [("node1", 4), ("node2", 4),
                                                                                    ("node3", 2)]


def test_dash_n_beyond_the_hosts_slots_is_refused():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "dtrain.launch", "-H", "a:2", "-n", "4", sys.executable, "-c", "pass"],
                       capture_output=True, text=True, timeout=30)
    # -n with -H takes the first n slots (horovodrun -np); more than the hosts offer is an error
    assert p.returncode != 0 and "offer 2 slot(s), so -np must be 1..2" in p.stderr, p.stderr


def test_the_shipped_ray_cluster_yaml_is_complete():
    import os
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with Ray")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(repo, "launch", "ray-cluster.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["provider"]["type"] == "local" and cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert any("pip install" in c and "-e ~/dtrain" in c for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])


def test_the_launcher_does_not_import_torch_and_dtrain_names_load_on_use():
    """dtrain-run only starts processes: importing torch there would cost each job ~1.2 s of a core."""
    import subprocess
    import sys
    code = ("import sys, dtrain, dtrain.launch.cli, dtrain.launch.hosts; assert 'torch' not in sys.modules, 'torch loaded'; "
            "import dtrain.errors; s = dtrain.AllReduceStrategy; g = dtrain.ops.fused_bias_gelu; "
            "assert 'torch' in sys.modules and dtrain.init is dtrain.comm.init; "
            "assert set(dtrain.__all__) <= set(dir(dtrain))\n"
            "try:\n    dtrain.no_such_name\nexcept AttributeError as e:\n    print(e)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "module 'dtrain' has no attribute 'no_such_name'" in p.stdout
